"""The one artifact format (`save_artifact` / `load_artifact`): round trip, old unnamed indexes,
and one clear InputError for a folder of another kind or with broken weights."""

from __future__ import annotations

import json

import pytest
import torch

from ctrl_ray.errors import InputError
from ctrl_ray.storage import WEIGHTS_FILE, load_artifact, save_artifact


def test_round_trip_with_extra_files_and_custom_names(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.long)}
    out = save_artifact(tmp_path / "x", "ctrl_ray.test", {"config": {"k": (1, 2)}}, tensors,
                        index="x.json", weights="w.safetensors",
                        write=lambda staging: (staging / "extra.txt").write_text("hi"))
    assert sorted(p.name for p in out.iterdir()) == ["extra.txt", "w.safetensors", "x.json"]
    assert json.loads((out / "x.json").read_text())["format"] == "ctrl_ray.test"
    document, loaded = load_artifact(out, "ctrl_ray.test", "test", index="x.json",
                                     weights="w.safetensors")
    assert document == {"config": {"k": [1, 2]}}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k])
                                                   for k in tensors)


def test_unnamed_indexes_load_only_where_allowed_and_other_kinds_never(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "policy.json").write_text(json.dumps({"label_classes": {"y": 2}}))
    document, _ = load_artifact(old, "ctrl_ray.policy", "policy", index="policy.json",
                                tensors=False, unnamed_ok=True)
    assert document == {"label_classes": {"y": 2}}
    with pytest.raises(InputError, match="not a policy"):
        load_artifact(old, "ctrl_ray.policy", "policy", index="policy.json", tensors=False)
    save_artifact(tmp_path / "clf", "ctrl_ray.classifier", {}, {"w": torch.zeros(1)})
    with pytest.raises(InputError, match="not a reward"):
        load_artifact(tmp_path / "clf", "ctrl_ray.reward", "reward", unnamed_ok=True)
    (tmp_path / "clf" / WEIGHTS_FILE).write_bytes(b"broken")
    with pytest.raises(InputError, match="corrupted"):
        load_artifact(tmp_path / "clf", "ctrl_ray.classifier", "classifier")
    with pytest.raises(InputError, match="does not exist"):
        load_artifact(tmp_path / "absent", "ctrl_ray.classifier", "classifier")
