"""Parquet datasets for ctrl-ray: the digits testbed, oracle labellers, offline label pairs, and
the import of a user's own labelled images (`importing`)."""

from ctrl_ray.data.digits import (
    DigitsDataset,
    build_digits,
    build_digits_table,
    load_digits_dataset,
    write_table,
)
from ctrl_ray.data.importing import ImportOptions, import_folder, import_parquet
from ctrl_ray.data.oracles import (
    ORACLES,
    Oracle,
    bin_by_edges,
    get_oracle,
    ink,
    jpeg_bytes,
    label_images,
    quartile_edges,
    to_uint8,
)
from ctrl_ray.data.pairs import PairSet, load_pairs, make_pairs, save_pairs

__all__ = [
    "ORACLES",
    "DigitsDataset",
    "ImportOptions",
    "Oracle",
    "PairSet",
    "bin_by_edges",
    "build_digits",
    "build_digits_table",
    "get_oracle",
    "import_folder",
    "import_parquet",
    "ink",
    "jpeg_bytes",
    "label_images",
    "load_digits_dataset",
    "load_pairs",
    "make_pairs",
    "quartile_edges",
    "save_pairs",
    "to_uint8",
    "write_table",
]
