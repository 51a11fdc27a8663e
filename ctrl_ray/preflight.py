"""Every check a command makes before its work: inputs, outputs and the cluster it will join.

The config types check their own values (`ctrl_ray.config`); what needs the file system or
the network is checked here, once, by one function per command, before Ray starts, an MLflow
run opens or training begins. Each failure is an `InputError` naming the key or option and the
value. Outputs follow one rule: a command never writes onto (or into, or around) one of its
inputs, never puts a file where a folder goes or the other way round, and replaces an existing
artifact only when asked (`--overwrite`).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from ctrl_ray.checkpoint_index import latest_checkpoint, saved_config
from ctrl_ray.config_changes import check_resume
from ctrl_ray.errors import InputError
from ctrl_ray.run_lock import check_unlocked
from ctrl_ray.tracking_store import tracking_uri

SYSTEM_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
NAME_MAX = 255
PATH_MAX = 4096
TEMP_NAME_EXTRA = 20  # the temporary sibling is ".NAME.XXXXXXXX" (+ ".old" when replacing)
MAX_SAMPLES = 1024
SEED_MAX = 2**32 - 1
PROBE_IMAGES = 4  # images a user's labeller labels before the work starts
CONNECT_TIMEOUT_S = float(os.environ.get("CTRL_RAY_CONNECT_TIMEOUT", "10"))

Inputs = Iterable[tuple[str, Any]]


# ------------------------------------------------------------------ paths


def check_output(path: str | os.PathLike, key: str, *, kind: Literal["file", "dir"],
                 inputs: Inputs = (), overwrite: bool = False,
                 suffixes: tuple[str, ...] = ()) -> Path:
    """Check that `path` can be written as a `kind` artifact before any work starts.

    Refuses: an empty path or too long a name, a place under /proc, /sys or /dev, a wrong
    suffix, a path that is, holds or lies inside one of `inputs` ((key, path) pairs), a file
    where a folder goes (or a folder where a file goes), an existing artifact without
    `overwrite` (an empty folder is not an artifact), and a parent that is a file or cannot
    be written.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise InputError(f"{key}: the output path is empty")
    absolute = Path(os.path.abspath(text))
    for part in absolute.parts[1:]:
        if len(os.fsencode(part)) + TEMP_NAME_EXTRA > NAME_MAX:
            raise InputError(f"{key}: the name {part[:40]!r}... is {len(os.fsencode(part))} "
                             f"bytes long; names here must stay under "
                             f"{NAME_MAX - TEMP_NAME_EXTRA} bytes")
    if len(os.fsencode(str(absolute))) + TEMP_NAME_EXTRA > PATH_MAX:
        raise InputError(f"{key}: the path is longer than {PATH_MAX - TEMP_NAME_EXTRA} bytes")
    resolved = absolute.resolve()
    for root in SYSTEM_ROOTS:
        if resolved == root or root in resolved.parents:
            raise InputError(f"{key}: {text!r} lies under {root}, which holds no user files")
    if suffixes and resolved.suffix.lower() not in suffixes:
        raise InputError(f"{key}: {text!r} must end in {' or '.join(suffixes)}")
    for input_key, input_path in inputs:
        if input_path is None or not str(input_path) or ":/" in str(input_path):
            continue  # no input, or a models:/ (runs:/, s3:/ ...) reference: not a local path
        source = Path(os.path.abspath(input_path)).resolve()
        if resolved == source:
            raise InputError(f"{key}: {text!r} is an input ({input_key}); a command never "
                             f"writes onto its inputs")
        if resolved in source.parents:
            raise InputError(f"{key}: {text!r} holds the input {input_key} "
                             f"({str(input_path)!r}); writing it could replace that input")
        if source in resolved.parents:
            raise InputError(f"{key}: {text!r} lies inside the input {input_key} "
                             f"({str(input_path)!r})")
    if os.path.lexists(resolved):
        if kind == "dir" and not resolved.is_dir():
            raise InputError(f"{key}: {text!r} is a file, not a folder")
        if kind == "file" and resolved.is_dir():
            raise InputError(f"{key}: {text!r} is a folder, not a file")
        if not overwrite and not (kind == "dir" and _is_empty_dir(resolved)):
            raise InputError(f"{key}: {text!r} already exists; pass --overwrite to replace it")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{key}: {str(ancestor)!r} is a file, so {text!r} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{key}: {str(ancestor)!r} is not writable")
    return Path(text)


def _is_empty_dir(path: Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError:
        return False


def check_input_file(path: str | os.PathLike, key: str) -> Path:
    """`path` must be an existing file (not a folder)."""
    return _check_input(Path(path), key, "file")


def check_input_dir(path: str | os.PathLike, key: str) -> Path:
    """`path` must be an existing folder (not a file)."""
    return _check_input(Path(path), key, "folder")


def _check_input(path: Path, key: str, kind: str) -> Path:
    other = "folder" if kind == "file" else "file"
    if path.is_file() if other == "file" else path.is_dir():
        raise InputError(f"{key}: {str(path)!r} is a {other}, not a {kind}")
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise InputError(f"{key}: {kind} not found: {str(path)!r}")
    return path


def check_model_ref(ref: str | os.PathLike, key: str) -> None:
    """A local model folder that exists, or a registry URI whose model version exists."""
    text = str(ref)
    if not text:
        raise InputError(f"{key}: no model given")
    if ":/" not in text:  # a local path (registry.is_uri's test, without importing MLflow)
        check_input_dir(text, key)
        return
    if not text.startswith("models:/"):
        return  # runs:/ and remote URIs are resolved (and reported) by MLflow itself
    import mlflow
    from mlflow.tracking import MlflowClient

    from ctrl_ray import tracking

    if not store_exists():
        raise InputError(f"{key}: {text!r} is not in the registry (there is no MLflow store "
                         f"at {tracking_uri()})")
    tracking.configure()
    name, _, which = text.removeprefix("models:/").partition("@")
    client = MlflowClient()
    try:
        if which:
            client.get_model_version_by_alias(name, which)
        else:
            name, _, version = name.partition("/")
            if version and version != "latest":
                client.get_model_version(name, version)
            elif not client.search_model_versions(f"name = '{name}'"):
                raise InputError(f"{key}: registered model {name!r} has no versions")
    except mlflow.exceptions.MlflowException as err:
        raise InputError(f"{key}: {text!r} is not in the registry ({err.message})") from None


BASE_INDEX = "ctrl_ray.json"  # ctrl_ray.models.loading's METADATA_FILE and BASE_FORMAT, named
BASE_FORMAT = "ctrl_ray.base_model"  # here so the check loads no diffusers


def check_base_model(ref: str | os.PathLike, key: str) -> dict[str, Any] | None:
    """A base model that `load_base_model_dir` can load: a Stable-Diffusion-format folder
    (`model_index.json`) or ctrl-ray's own (`ctrl_ray.json`, `unet/`, `scheduler/`), or a
    registry URI. Returns the local folder's metadata (None for a URI), read without
    loading a network."""
    from ctrl_ray.storage import load_artifact, read_json

    check_model_ref(ref, key)
    if ":/" in str(ref):
        return None
    path = Path(ref)
    if (path / "model_index.json").is_file():
        extra = path / BASE_INDEX
        metadata = _keyed(key, read_json, extra, "base model metadata") if extra.is_file() \
            else {}
        return {"prompts": [], **metadata, "kind": "stable-diffusion"}
    if not (path / BASE_INDEX).is_file() and not any(path.iterdir()):
        raise InputError(f"{key}: {str(ref)!r} is an empty folder, not a base model")
    metadata, _ = _keyed(key, load_artifact, path, BASE_FORMAT, "base model",
                         index=BASE_INDEX, tensors=False, unnamed_ok=True)
    for part in ("unet", "scheduler"):
        if not (path / part).is_dir():
            raise InputError(f"{key}: base model {str(ref)!r} has no {part}/ folder")
    return metadata


def check_contexts(contexts: list | None, metadata: dict[str, Any] | None,
                   prompts: list[str] | None, key: str) -> None:
    """Evaluation contexts the model knows: class ids below its number of contexts for a
    class-conditional model, prompt indices below its number of prompts (or any prompt text)
    for a text-to-image one. Unknown (a registry model): left to the run."""
    if not contexts or metadata is None:
        return
    text_model = "prompts" in metadata or str(metadata.get("kind", "")).endswith(
        ("text-conditional", "stable-diffusion"))
    if text_model:
        known = prompts if prompts is not None else metadata.get("prompts")
        count = None if known is None else len(known)
        what = "prompts"
    else:
        count, what = metadata.get("num_contexts"), "contexts (class ids)"
    for value in contexts:
        if isinstance(value, str):
            if not text_model:
                raise InputError(f"{key}: prompt {value!r} given, but the model is "
                                 f"class-conditional: give class ids")
            continue
        if isinstance(count, int) and not 0 <= value < count:
            raise InputError(f"{key}: context {value} is outside the model's {count} {what} "
                             f"(0..{count - 1})")


def store_exists() -> bool:
    """False for a local SQLite store that has not been created yet (reading it would create
    it, a new file in the user's folder): it holds no runs and no models."""
    uri = tracking_uri()
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


def registry_store() -> None:
    """`registry list` reads the store: a local SQLite store that does not exist is named (a
    mistyped MLFLOW_TRACKING_URI), not created empty."""
    if store_exists():
        return
    path = tracking_uri().removeprefix("sqlite:///")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise InputError(f"MLFLOW_TRACKING_URI: there is no MLflow store at {path!r}")
    raise InputError(f"there is no MLflow store here ({path!r}): nothing has been tracked in "
                     f"this folder; set MLFLOW_TRACKING_URI to your store")


def check_range(value: Any, key: str, low: float, high: float = math.inf) -> None:
    """A number given on the command line must lie in [low, high]."""
    if value is None:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        bound = f">= {low:g}" if high == math.inf else f"{low:g}..{high:g}"
        raise InputError(f"{key}: {value!r} is out of range (expected {bound})")


# ------------------------------------------------------------------ the cluster


def check_cluster_address(address: str | None, key: str, timeout_s: float | None = None) -> None:
    """Fail within `timeout_s` (default CTRL_RAY_CONNECT_TIMEOUT, 10 s) when the Ray cluster at
    `address` (or RAY_ADDRESS) does not answer, instead of letting `ray.init` wait forever."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    if os.environ.get("RAY_ADDRESS") and address in (None, "", "auto"):
        address, key = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"  # what ray.init joins then
    if address == "auto":
        address = _running_cluster(key)
    if not address or address == "local":
        return
    text = address.strip()
    default_port = 6379
    for scheme, port in (("ray://", 10001), ("http://", 8265), ("https://", 443)):
        if text.startswith(scheme):
            text, default_port = text[len(scheme):], port
    host, sep, port_text = text.rstrip("/").rpartition(":")
    if not sep:
        host, port_text = text.rstrip("/"), str(default_port)
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(f"{key}: {address!r} is not a Ray address (host:port or "
                         f"ray://host:port)")
    try:
        socket.create_connection((host, int(port_text)), timeout=timeout_s).close()
    except OSError as err:
        reason = f"no answer within {timeout_s:g} s" if isinstance(err, TimeoutError) else \
            (err.strerror or str(err)).lower()
        raise InputError(f"{key}: no Ray cluster answers at {address!r} ({reason})") from None
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")
    if default_port == 6379 and not tls:  # a GCS address: ask for the cluster id, as ray.init
        _probe_gcs(f"{host}:{port_text}", address, key, timeout_s)


def _running_cluster(key: str) -> str | None:
    """The address `ray.init(address="auto")` would join; InputError if there is none."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return None
    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise InputError(f"{key}: 'auto' finds no running Ray cluster on this machine (start "
                         f"one with `ray start --head`, or give its host:port)") from None


def _probe_gcs(target: str, address: str, key: str, timeout_s: float) -> None:
    """Something accepted the connection: fail unless it answers as a Ray GCS (the stub of
    the installed Ray, whose version the cluster must share) within `timeout_s`."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    with grpc.insecure_channel(target) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return  # a Ray GCS that wants a token: ray.init will present it
            reason = f"no answer within {timeout_s:g} s" \
                if code == grpc.StatusCode.DEADLINE_EXCEEDED else \
                f"what listens there is not a Ray GCS: {code.name}"
            raise InputError(f"{key}: no Ray cluster answers at {address!r} ({reason})") \
                from None


# ------------------------------------------------------------------ per command


def _keyed(key: str, call, *args, **kwargs):
    """Run a loader, putting `key` in front of its InputError."""
    try:
        return call(*args, **kwargs)
    except InputError as err:
        message = str(err)
        raise InputError(message if message.startswith(key) else f"{key}: {message}") from None


def build_digits(out: str, seed: int, overwrite: bool) -> None:
    check_range(seed, "--seed", 0, SEED_MAX)
    check_output(out, "--out", kind="file", overwrite=overwrite)


def pairs(dataset: str, label: str, n: int, seed: int, out: str, overwrite: bool) -> None:
    from ctrl_ray.data.digits import load_digits_dataset

    check_range(n, "--n", 1)
    check_range(seed, "--seed", 0, SEED_MAX)
    check_input_file(dataset, "--dataset")
    check_output(out, "--out", kind="file", inputs=[("--dataset", dataset)], overwrite=overwrite)
    loaded = _keyed("--dataset", load_digits_dataset, dataset)
    if label not in loaded.label_info:
        raise InputError(f"--label: unknown label {label!r}; {dataset} has "
                         f"{', '.join(sorted(loaded.label_info))}")
    train = int((loaded.split == "train").sum())
    if n > train:
        raise InputError(f"--n: {n} pairs asked for, but the train split of {dataset} has "
                         f"{train} images")


def _check_unet(model, key: str) -> None:
    """What diffusers would reject only after the run started: group norm and down-sampling."""
    for channels in model.block_out_channels:
        if channels % model.norm_num_groups:
            raise InputError(f"{key}.block_out_channels: {list(model.block_out_channels)} are "
                             f"not all multiples of {key}.norm_num_groups "
                             f"{model.norm_num_groups}")
    factor = 2 ** (len(model.block_out_channels) - 1)
    if model.image_size % factor:
        raise InputError(f"{key}.image_size: {model.image_size} is not divisible by {factor} "
                         f"({len(model.block_out_channels)} resolution levels)")


def pretrain(config, overwrite: bool) -> None:
    from ctrl_ray.data.digits import require_digits

    require_digits(config.data.path, config.data.size, key="data.path")
    _check_unet(config.model, "model")
    check_output(config.output_dir, "output_dir", kind="dir",
                 inputs=[("data.path", config.data.path)], overwrite=overwrite)


def reward(config, overwrite: bool) -> None:
    """`reward train`: the pairs (read, or drawn from the digits file to a new file), the
    digits file wherever it is read, and the output folder. The pairs' label must be the
    config's `label`: a reward is never saved under another label's name."""
    from ctrl_ray.data.digits import load_digits_dataset, require_digits
    from ctrl_ray.data.oracles import ORACLES
    from ctrl_ray.data.pairs import load_pairs

    inputs: list[tuple[str, Any]] = []
    if os.path.lexists(config.pairs):
        check_input_file(config.pairs, "pairs")
        loaded = _keyed("pairs", load_pairs, config.pairs)
        inputs.append(("pairs", config.pairs))
        if loaded.label_name != config.label:
            raise InputError(f"label: {config.label!r}, but pairs {config.pairs!r} are "
                             f"labelled {loaded.label_name!r}")
        if loaded.heldout is None and loaded.label_name in ORACLES \
                and not Path(config.dataset).is_file():
            raise InputError(f"dataset: file not found: {config.dataset!r} (pairs "
                             f"{config.pairs!r} hold no rows out, so the reward's test accuracy "
                             f"is measured on the digits test split of this file)")
        if config.labeller:
            check_labeller(config.labeller, loaded, "labeller")
        if Path(config.dataset).is_file():  # the digits test split scores a built-in label
            dataset = _keyed("dataset", load_digits_dataset, config.dataset)
            inputs.append(("dataset", config.dataset))
            if loaded.label_name in dataset.label_info:
                size = loaded.image_shape[-1]
                if size != config.size or dataset.image_shape[-1] != config.size:
                    raise InputError(f"size: {config.size}, but pairs {config.pairs!r} hold "
                                     f"{size}x{size} images and dataset {config.dataset!r} "
                                     f"{dataset.image_shape[-1]}x{dataset.image_shape[-1]}")
    else:
        if config.label not in ORACLES:
            raise InputError(f"pairs: file not found: {config.pairs!r} (label "
                             f"{config.label!r} is not a digits-testbed label; import your "
                             f"own pairs with `ctrl-ray data import`)")
        dataset = require_digits(config.dataset, config.size, key="dataset")
        inputs.append(("dataset", config.dataset))
        if config.label not in dataset.label_info:
            raise InputError(f"label: unknown label {config.label!r}; {config.dataset} has "
                             f"{', '.join(sorted(dataset.label_info))}")
        train = int((dataset.split == "train").sum())
        check_range(config.num_pairs, "num_pairs", 1, train)
        check_range(config.pairs_seed, "pairs_seed", 0, SEED_MAX)
        check_output(config.pairs, "pairs", kind="file", inputs=inputs)
    check_output(config.output_dir, "output_dir", kind="dir", inputs=inputs, overwrite=overwrite)


def check_labeller(spec: str, pairs, key: str) -> None:
    """`reward train`'s labeller: it imports, is a function, and labels the first pairs with
    one class of the label each (its agreement with all of them is measured in the run)."""
    from ctrl_ray.scoring import get_scorer, parse_scorer

    entry = _keyed(key, parse_scorer, spec, pairs.label_name)
    if entry["kind"] != "labeller":
        raise InputError(f"{key}: expected module:function or file.py:function, got {spec!r}")
    info = {"num_classes": pairs.num_classes, "edges": pairs.edges,
            "class_names": pairs.names}
    scorer = _keyed(key, get_scorer, pairs.label_name, info, entry["function"])
    _keyed(key, scorer.label, pairs.images[:PROBE_IMAGES])


def check_scorers(label_info: dict[str, dict], overrides: dict[str, str],
                  image_shape: list[int] | None, key: str) -> None:
    """Every label's scorer loads (`evaluation.scorers` overrides name only known labels), and
    a user's labeller labels a few images of the model's `image_shape` (when known) with one
    class each, before any sampling."""
    from ctrl_ray.scoring import get_scorer

    unknown = sorted(set(overrides) - set(label_info))
    if unknown:
        raise InputError(f"{key}.{unknown[0]}: the model has no label {unknown[0]!r} "
                         f"(labels: {sorted(label_info)})")
    probe = None
    if image_shape:
        import numpy as np

        count = PROBE_IMAGES * math.prod(image_shape)
        probe = np.linspace(-1, 1, count, dtype=np.float32).reshape(PROBE_IMAGES, *image_shape)
    for name, info in label_info.items():
        where = f"{key}.{name}" if name in overrides else key
        scorer = _keyed(where, get_scorer, name, info, overrides.get(name))
        if scorer.kind == "labeller" and probe is not None:
            _keyed(where, scorer.label, probe)


def _check_rewards(specs, key: str):
    if not specs:
        raise InputError(f"{key}: at least one reward classifier is needed")
    for index, spec in enumerate(specs):
        check_input_dir(spec.path, f"{key}[{index}].path")
    from ctrl_ray.finetune_setup import load_rewards

    return _keyed(key, load_rewards, specs)


def _check_judge(path: str | None, key: str) -> None:
    if not path:
        return
    check_input_dir(path, key)
    from ctrl_ray.models.judge import DigitJudge

    _keyed(key, DigitJudge.load, path)


def finetune(config, overwrite: bool, resume: bool | str = False,
             allow_config_change: bool = False) -> None:
    """`finetune`: the base model, rewards and judge exist and load, the batch splits over the
    workers, the cluster answers, the output folder is free (no other run holds it) or resumed,
    and a resume changes nothing that alters training (unless `allow_config_change`)."""
    config.check_evaluation_chain()
    warn_stale_gradients(config)
    workers = config.distributed.workers
    batch_size = getattr(config.objective, "batch_size", None)
    if workers and batch_size is not None and workers > batch_size:
        raise InputError(f"distributed.workers: {workers} workers cannot share a batch of "
                         f"{batch_size} (objective.batch_size)")
    inputs = [("base_model", config.base_model), ("judge", config.judge),
              *((f"rewards[{i}].path", r.path) for i, r in enumerate(config.rewards))]
    check_output(config.output_dir, "output_dir", kind="dir", inputs=inputs,
                 overwrite=overwrite or bool(resume))
    check_unlocked(config.output_dir, "output_dir")
    checkpoint = latest_checkpoint(Path(config.output_dir) / "checkpoints") if resume else None
    if resume is True and checkpoint is None:
        raise InputError(f"--resume: no checkpoint under "
                         f"{str(Path(config.output_dir) / 'checkpoints')!r} to resume from "
                         f"(--resume-if-present starts over when there is none)")
    if checkpoint is not None:
        check_resume(saved_config(checkpoint), config, allow_config_change)
    metadata = check_base_model(config.base_model, "base_model")
    check_contexts(config.evaluation.contexts, metadata, config.backbone.prompts,
                   "evaluation.contexts")
    reward = _check_rewards(config.rewards, "rewards")
    if config.evaluate:
        _check_judge(config.judge, "judge")
        check_scorers(reward.label_info(), dict(config.evaluation.scorers),
                      _pixel_shape(metadata), "evaluation.scorers")
    if workers:
        check_cluster_address(config.distributed.address, "distributed.address")


def evaluate(model: str, config, overwrite: bool) -> None:
    """`evaluate`: the policy, the judge, the output grid; for a local policy also its base
    model, the contexts it knows and its labels' scorers."""
    check_model_ref(model, "--model")
    _check_judge(config.judge, "judge")
    check_output(Path(config.output_dir) / "evaluate_grid.png", "output_dir", kind="file",
                 inputs=[("--model", model), ("judge", config.judge)], overwrite=overwrite)
    spec = _local_policy_spec(model)
    if spec is None:
        return
    base = str(spec.get("base_model", ""))  # a registry base is resolved (and named) by the load
    metadata = check_base_model(base, "--model's base model") \
        if base and ":/" not in base and Path(base).is_dir() else None
    prompts = (spec.get("backbone") or {}).get("prompts")
    check_contexts(config.evaluation.contexts, metadata, prompts, "evaluation.contexts")
    check_scorers(dict(spec.get("label_info") or {}), dict(config.evaluation.scorers),
                  _pixel_shape(metadata), "evaluation.scorers")


def _local_policy_spec(model: str) -> dict[str, Any] | None:
    """The spec of a local CTRL policy folder (None for a URI or a base model folder)."""
    from ctrl_ray.storage import load_artifact

    if ":/" in str(model) or not (Path(model) / "policy.json").is_file():
        return None
    spec, _ = _keyed("--model", load_artifact, model, "ctrl_ray.policy", "policy",
                     index="policy.json", tensors=False, unnamed_ok=True)
    return spec


def _pixel_shape(metadata: dict[str, Any] | None) -> list[int] | None:
    """The (C, H, W) of a pixel model's images; None for a latent model (its decode's size is
    the VAE's to say) or an unknown one."""
    if not metadata or metadata.get("kind") == "stable-diffusion":
        return None
    shape = metadata.get("image_shape")
    return list(shape) if isinstance(shape, list) and len(shape) == 3 else None


def sample(model: str, n: int, seed: int, y: int, guidance_scale: float | None, out: str,
           overwrite: bool) -> None:
    check_range(n, "--n", 1, MAX_SAMPLES)
    check_range(seed, "--seed", 0, SEED_MAX)
    check_range(y, "--y", -1)
    check_range(guidance_scale, "--guidance-scale", 0, 1000)
    check_model_ref(model, "--model")
    check_output(out, "--out", kind="file", inputs=[("--model", model)], overwrite=overwrite,
                 suffixes=(".png",))


def baseline(kind: str, config, overwrite: bool) -> None:
    check_base_model(config.base_model, "base_model")
    _check_judge(config.judge, "judge")
    inputs = [("base_model", config.base_model), ("judge", config.judge)]
    if kind == "dps":
        _check_rewards(config.rewards, "rewards")
        inputs += [(f"rewards[{i}].path", r.path) for i, r in enumerate(config.rewards)]
    elif kind == "cfg" and config.model:
        check_input_dir(config.model, "model")
        inputs.append(("model", config.model))
    elif kind == "cg" and config.classifiers:
        for index, path in enumerate(config.classifiers):
            check_input_dir(path, f"classifiers[{index}]")
            inputs.append((f"classifiers[{index}]", path))
    else:
        inputs += _baseline_pairs(config)
    check_output(config.output_dir, "output_dir", kind="dir", inputs=inputs, overwrite=overwrite)


def _baseline_pairs(config) -> list[tuple[str, Any]]:
    """The dataset and each pair set a CFG/CG baseline trains on (a missing set is drawn)."""
    from ctrl_ray.data.digits import load_digits_dataset
    from ctrl_ray.data.pairs import load_pairs

    if not config.pairs:
        raise InputError("pairs: at least one pair set is needed")
    check_input_file(config.dataset, "dataset")
    dataset = _keyed("dataset", load_digits_dataset, config.dataset)
    inputs: list[tuple[str, Any]] = [("dataset", config.dataset)]
    for index, spec in enumerate(config.pairs):
        key = f"pairs[{index}]"
        if os.path.lexists(spec.path):
            check_input_file(spec.path, f"{key}.path")
            loaded = _keyed(f"{key}.path", load_pairs, spec.path)
            if loaded.label_name != spec.label:
                raise InputError(f"{key}.label: {spec.label!r}, but {spec.path!r} holds "
                                 f"{loaded.label_name!r} pairs")
            inputs.append((f"{key}.path", spec.path))
        else:
            if spec.label not in dataset.label_info:
                raise InputError(f"{key}.label: unknown label {spec.label!r}; "
                                 f"{config.dataset} has {', '.join(sorted(dataset.label_info))}")
            check_range(spec.num_pairs, f"{key}.num_pairs", 1,
                        int((dataset.split == "train").sum()))
            check_output(spec.path, f"{key}.path", kind="file", inputs=inputs)
    return inputs


def tune(config, overwrite: bool) -> None:
    from ctrl_ray.tuning.configs import check_inputs

    check_inputs(config)
    finetune_config = config.finetune
    inputs = [("finetune.base_model", finetune_config.base_model),
              ("finetune.judge", finetune_config.judge),
              *((f"finetune.rewards[{i}].path", r.path)
                for i, r in enumerate(finetune_config.rewards))]
    check_output(config.output_dir, "output_dir", kind="dir", inputs=inputs, overwrite=overwrite)
    if config.storage_path and ":/" not in config.storage_path:  # a local folder
        check_output(config.storage_path, "storage_path", kind="dir", inputs=inputs,
                     overwrite=True)
    check_base_model(finetune_config.base_model, "finetune.base_model")
    _check_rewards(finetune_config.rewards, "finetune.rewards")
    check_cluster_address(finetune_config.distributed.address, "finetune.distributed.address")


def tiny_pipeline(out: str, overwrite: bool) -> None:
    check_output(out, "--out", kind="dir", overwrite=overwrite)


def latent_testbed(config, overwrite: bool) -> None:
    """`text2image build`: the digits file at the configured size, the output folder, and the
    registered name."""
    from ctrl_ray.data.digits import require_digits

    require_digits(config.data.path, config.data.size, key="data.path")
    check_output(config.output_dir, "output_dir", kind="dir",
                 inputs=[("data.path", config.data.path)], overwrite=overwrite)
    if config.registered_model:  # last: MLflow's name check imports MLflow
        from ctrl_ray import registry

        registry.check_name(config.registered_model, "registered_model")


def warn_stale_gradients(config) -> None:
    """Rollouts ahead of the learner cost the value rule nothing (its base rollouts do not
    depend on the policy) and PPO corrects them with its ratio; adjoint matching and pathwise
    apply them uncorrected, which on the digits cost 11x the KL (benchmarks/staleness.py)."""
    if config.distributed.max_staleness and config.mode in ("adjoint", "pathwise"):
        print(f"warning: distributed.max_staleness {config.distributed.max_staleness} with mode "
              f"{config.mode}: its gradients come from rollouts of an older policy, "
              f"uncorrected (measured on the digits ink run: 6.2 nats of KL instead of 0.54); "
              f"the value rule and ppo are the ones to overlap")


def flow_testbed(config, overwrite: bool) -> None:
    """`flow build`: the latent testbed it reuses (its VAE, text encoder and digits file), the
    output folder, and the registered name."""
    from ctrl_ray.data.digits import require_digits
    from ctrl_ray.flow_testbed_config import read_latent_testbed

    facts = read_latent_testbed(config)
    require_digits(facts.metadata["dataset"], facts.image_size, key="latent_testbed")
    check_output(config.output_dir, "output_dir", kind="dir",
                 inputs=[("latent_testbed", config.latent_testbed)], overwrite=overwrite)
    if config.registered_model:  # last: MLflow's name check imports MLflow
        from ctrl_ray import registry

        registry.check_name(config.registered_model, "registered_model")


def demo(config, overwrite: bool) -> None:
    """The demo builds what is missing at its documented defaults (data, judge, pairs, base
    model) and always writes the reward, the CTRL run and its own output folder."""
    from ctrl_ray.data.digits import require_digits

    data = config.pretrain.data
    if os.path.lexists(data.path):
        require_digits(data.path, data.size, key="pretrain.data.path")
    else:
        check_output(data.path, "pretrain.data.path", kind="file")
    if os.path.lexists(config.judge.path):
        _check_judge(config.judge.path, "judge.path")
    else:
        check_output(config.judge.path, "judge.path", kind="dir")
    _check_unet(config.pretrain.model, "pretrain.model")
    inputs = [("pretrain.data.path", data.path), ("judge.path", config.judge.path)]
    if config.reward.dataset != data.path:
        require_digits(config.reward.dataset, config.reward.size, key="reward.dataset")
        inputs.append(("reward.dataset", config.reward.dataset))
    if not os.path.lexists(config.reward.pairs):
        check_output(config.reward.pairs, "reward.pairs", kind="file", inputs=inputs)
    for key, path in (("reward.output_dir", config.reward.output_dir),
                      ("finetune.output_dir", config.finetune.output_dir),
                      ("output_dir", config.output_dir)):
        check_output(path, key, kind="dir", inputs=inputs, overwrite=overwrite)
    if config.finetune.distributed.workers:
        check_cluster_address(config.finetune.distributed.address,
                              "finetune.distributed.address")
    name = config.pretrain.registered_model
    reuses_base = bool(config.reuse_registered_base and name and store_exists())
    if reuses_base:  # last: reading the registry imports MLflow
        from ctrl_ray import registry

        reuses_base = registry.latest_version(name) is not None
    if not reuses_base:  # the demo pre-trains
        check_output(config.pretrain.output_dir, "pretrain.output_dir", kind="dir",
                     inputs=[("pretrain.data.path", data.path)], overwrite=overwrite)
