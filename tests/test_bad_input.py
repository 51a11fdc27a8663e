"""Bad input never costs a user data: a table of bad inputs across every subcommand.

Each case runs the real command line in-process and must: exit 2, print exactly one line on
stderr naming the key or file, print no traceback, leave every file of the workspace (and of
the models it reads) byte-identical with no new path, and add no MLflow run and no registered
model version. Every case fails in the preflight, before Ray, MLflow runs or training.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from ctrl_ray import preflight
from ctrl_ray.cli import main

LONG = "n" * 300

# (id, argv, what the one line must name). {name} placeholders are the workspace's paths.
PRETRAIN = ["pretrain", "--config", "{pretrain_yaml}"]
REWARD = ["reward", "train", "--config", "{reward_yaml}"]
FINETUNE = ["finetune", "--config", "{finetune_yaml}"]
EVALUATE = ["evaluate", "--model", "{policy}", "--config", "{finetune_yaml}"]
SAMPLE = ["sample", "--model", "{policy}", "--c", "1", "--y", "0"]
BASELINE = ["--config", "{baseline_yaml}"]
TUNE = ["tune", "--config", "{tune_yaml}"]
DEMO = ["demo", "--config", "{demo_yaml}"]
AUDIT = ["reward", "audit", "--base", "{base}", "--reward", "{reward}", "--judge", "{judge}"]
IMPORT = ["data", "import", "--images", "images", "--labels", "images.csv"]
IMPORT_PARQUET = ["data", "import", "--parquet", "data/pairs8.parquet", "--label-column",
                  "label"]

CASES = [
    # -- config files and --set overrides
    ("config-missing", ["pretrain", "--config", "missing.yaml"], "missing.yaml"),
    ("config-malformed", ["pretrain", "--config", "malformed.yaml"], "malformed.yaml"),
    ("config-not-mapping", ["pretrain", "--config", "list.yaml"], "list.yaml"),
    ("config-is-folder", ["pretrain", "--config", "existing_dir"], "existing_dir"),
    ("config-binary", ["pretrain", "--config", "binary.yaml"], "binary.yaml"),
    ("set-unknown-key", [*PRETRAIN, "--set", "training.stepz=3"], "training.stepz"),
    ("set-no-equals", [*PRETRAIN, "--set", "noequals"], "noequals"),
    ("set-empty-part", [*PRETRAIN, "--set", "training..steps=3"], "training..steps"),
    ("set-section-scalar", [*PRETRAIN, "--set", "training=3"], "'training'"),
    ("set-wrong-type", [*PRETRAIN, "--set", "training.batch_size=1.5"], "training.batch_size"),
    ("set-nan-string", [*PRETRAIN, "--set", "training.lr=nan"], "training.lr"),
    ("set-literal", [*PRETRAIN, "--set", "conditioning=image"], "conditioning"),
    # -- pretrain: ranges, agreement, inputs, outputs
    ("pretrain-steps-0", [*PRETRAIN, "--set", "training.steps=0"], "training.steps"),
    ("pretrain-steps-neg", [*PRETRAIN, "--set", "training.steps=-5"], "training.steps"),
    ("pretrain-lr-0", [*PRETRAIN, "--set", "training.lr=0"], "training.lr"),
    ("pretrain-lr-neg-exp", [*PRETRAIN, "--set", "training.lr=-1e-3"], "training.lr"),
    ("pretrain-ema-1", [*PRETRAIN, "--set", "training.ema_decay=1"], "training.ema_decay"),
    ("pretrain-seed-neg", [*PRETRAIN, "--set", "training.seed=-1"], "training.seed"),
    ("pretrain-size-12", [*PRETRAIN, "--set", "data.size=12"], "data.size"),
    ("pretrain-size-mismatch", [*PRETRAIN, "--set", "model.image_size=16"], "model.image_size"),
    ("pretrain-groups", [*PRETRAIN, "--set", "model.norm_num_groups=7"], "norm_num_groups"),
    ("pretrain-schedule", [*PRETRAIN, "--set", "schedule.beta_schedule=cosine"],
     "schedule.beta_schedule"),
    ("pretrain-template", [*PRETRAIN, "--set", "text.prompt_template=a {{x}}"],
     "text.prompt_template"),
    ("pretrain-data-typo", [*PRETRAIN, "--set", "data.path=data/typo.parquet"], "typo.parquet"),
    ("pretrain-data-not-parquet", [*PRETRAIN, "--set", "data.path=NOTES"], "NOTES"),
    ("pretrain-data-size", [*PRETRAIN, "--set", "data.path=data/d16.parquet"], "d16.parquet"),
    ("pretrain-out-file", [*PRETRAIN, "--set", "output_dir=NOTES"], "NOTES"),
    ("pretrain-out-exists", [*PRETRAIN, "--set", "output_dir=existing_dir"], "existing_dir"),
    ("pretrain-out-proc", [*PRETRAIN, "--set", "output_dir=/proc/ctrl-ray"], "/proc"),
    ("pretrain-out-under-file", [*PRETRAIN, "--set", "output_dir=NOTES/model"], "NOTES"),
    ("pretrain-out-long", [*PRETRAIN, "--set", f"output_dir=outputs/{LONG}"], "output_dir"),
    ("pretrain-out-is-input", [*PRETRAIN, "--set", "output_dir=data/d8.parquet"], "output_dir"),
    ("pretrain-out-holds-input", [*PRETRAIN, "--set", "output_dir=data"], "output_dir"),
    # -- data build-digits / pairs
    ("digits-size", ["data", "build-digits", "--size", "7", "--out", "x.parquet"], "--size"),
    ("digits-out-exists", ["data", "build-digits", "--size", "8", "--out", "NOTES"], "NOTES"),
    ("digits-out-folder", ["data", "build-digits", "--size", "8", "--out", "existing_dir"],
     "existing_dir"),
    ("digits-out-proc", ["data", "build-digits", "--size", "8", "--out", "/proc/d.parquet"],
     "/proc"),
    ("digits-out-under-file", ["data", "build-digits", "--out", "NOTES/d.parquet"], "NOTES"),
    ("digits-seed", ["data", "build-digits", "--seed", "-1", "--out", "x.parquet"], "--seed"),
    ("pairs-onto-dataset", ["data", "pairs", "--dataset", "data/d8.parquet", "--label",
                            "compress_class", "--n", "10", "--out", "data/d8.parquet"], "--out"),
    ("pairs-dataset-missing", ["data", "pairs", "--dataset", "nope.parquet", "--label",
                               "compress_class", "--n", "10", "--out", "p.parquet"],
     "nope.parquet"),
    ("pairs-dataset-corrupt", ["data", "pairs", "--dataset", "NOTES", "--label",
                               "compress_class", "--n", "10", "--out", "p.parquet"], "NOTES"),
    ("pairs-dataset-folder", ["data", "pairs", "--dataset", "existing_dir", "--label",
                              "compress_class", "--n", "10", "--out", "p.parquet"],
     "existing_dir"),
    ("pairs-label", ["data", "pairs", "--dataset", "data/d8.parquet", "--label", "sharpness",
                     "--n", "10", "--out", "p.parquet"], "--label"),
    ("pairs-n-0", ["data", "pairs", "--dataset", "data/d8.parquet", "--label",
                   "compress_class", "--n", "0", "--out", "p.parquet"], "--n"),
    ("pairs-n-huge", ["data", "pairs", "--dataset", "data/d8.parquet", "--label",
                      "compress_class", "--n", "100000", "--out", "p.parquet"], "--n"),
    ("pairs-n-text", ["data", "pairs", "--dataset", "data/d8.parquet", "--label",
                      "compress_class", "--n", "ten", "--out", "p.parquet"], "--n"),
    ("pairs-out-exists", ["data", "pairs", "--dataset", "data/d8.parquet", "--label",
                          "compress_class", "--n", "10", "--out", "data/pairs8.parquet"],
     "pairs8.parquet"),
    # -- reward train
    ("reward-label-mismatch", [*REWARD, "--set", "label=ink_class"], "label"),
    ("reward-size-mismatch", [*REWARD, "--set", "size=16"], "size"),
    ("reward-out-exists", [*REWARD, "--set", "output_dir=reward_existing"], "reward_existing"),
    ("reward-dataset-typo", [*REWARD, "--set", "dataset=data/typo.parquet", "--set",
                             "pairs=data/new-pairs.parquet"], "typo.parquet"),
    ("reward-num-pairs", [*REWARD, "--set", "pairs=data/new-pairs.parquet", "--set",
                          "num_pairs=0"], "num_pairs"),
    ("reward-epochs", [*REWARD, "--set", "training.epochs=0"], "training.epochs"),
    ("reward-out-is-pairs", [*REWARD, "--set", "output_dir=data/pairs8.parquet"], "output_dir"),
    ("reward-out-file", [*REWARD, "--set", "output_dir=NOTES"], "NOTES"),
    ("audit-base-missing", [*AUDIT, "--base", "missing_base"], "missing_base"),
    ("audit-reward-missing", ["reward", "audit", "--base", "{base}", "--reward",
                              "missing_reward", "--judge", "{judge}"], "missing_reward"),
    ("audit-out-file", [*AUDIT, "--out", "NOTES"], "NOTES"),
    ("audit-out-is-reward", [*AUDIT, "--out", "{reward}"], "output_dir"),
    # -- finetune
    ("finetune-iterations", [*FINETUNE, "--set", "iterations=-3"], "iterations"),
    ("finetune-workers-neg", [*FINETUNE, "--workers", "-1"], "distributed.workers"),
    ("finetune-workers-batch", [*FINETUNE, "--workers", "9"], "distributed.workers"),
    ("finetune-value-chain", [*FINETUNE, "--set", "evaluation.num_inference_steps=50"],
     "evaluation.num_inference_steps 50"),
    ("finetune-judge-missing", [*FINETUNE, "--set", "judge=missing_judge"], "missing_judge"),
    ("finetune-reward-missing", [*FINETUNE, "--set", "rewards=[{{path: missing_reward}}]"],
     "rewards[0].path"),
    ("finetune-no-rewards", [*FINETUNE, "--set", "rewards=[]"], "rewards"),
    ("finetune-base-missing", [*FINETUNE, "--set", "base_model=missing_base"], "missing_base"),
    ("finetune-base-uri", [*FINETUNE, "--set", "base_model=models:/no-such-model@champion"],
     "models:/no-such-model@champion"),
    ("finetune-batch-0", [*FINETUNE, "--set", "objective.batch_size=0"],
     "objective.batch_size"),
    ("finetune-lr-neg", [*FINETUNE, "--set", "objective.lr_adapter=-1e-3"],
     "objective.lr_adapter"),
    ("finetune-adapter", [*FINETUNE, "--set", "adapter.kind=lorra"], "adapter.kind"),
    ("finetune-mode", [*FINETUNE, "--mode", "sgd"], "--mode"),
    ("finetune-refused", [*FINETUNE, "--workers", "1", "--address", "127.0.0.1:1"],
     "127.0.0.1:1"),
    ("finetune-no-answer", [*FINETUNE, "--workers", "1", "--address", "10.255.255.1:6379"],
     "10.255.255.1:6379"),
    ("finetune-bad-address", [*FINETUNE, "--workers", "1", "--address", "host:port"],
     "host:port"),
    ("finetune-out-exists", [*FINETUNE, "--set", "output_dir=existing_dir"], "existing_dir"),
    ("finetune-out-file", [*FINETUNE, "--set", "output_dir=NOTES"], "NOTES"),
    ("finetune-resume-nothing", [*FINETUNE, "--resume", "--set", "output_dir=fresh_run"],
     "--resume"),
    ("finetune-out-is-reward", [*FINETUNE, "--set", "output_dir={reward}"], "output_dir"),
    # -- evaluate and sample
    ("evaluate-model-missing", ["evaluate", "--model", "missing_policy", "--config",
                                "{finetune_yaml}"], "missing_policy"),
    ("evaluate-grid-exists", [*EVALUATE, "--set", "output_dir=eval_out"], "eval_out"),
    ("evaluate-samples-0", [*EVALUATE, "--set", "evaluation.samples_per_target=0"],
     "evaluation.samples_per_target"),
    ("evaluate-judge-missing", [*EVALUATE, "--set", "judge=missing_judge"], "missing_judge"),
    ("sample-n-0", [*SAMPLE, "--n", "0", "--out", "s.png"], "--n"),
    ("sample-n-huge", [*SAMPLE, "--n", "100000000", "--out", "s.png"], "--n"),
    ("sample-seed", [*SAMPLE, "--seed", "-1", "--out", "s.png"], "--seed"),
    ("sample-out-txt", [*SAMPLE, "--out", "grid.txt"], "grid.txt"),
    ("sample-out-folder", [*SAMPLE, "--out", "existing_dir"], "existing_dir"),
    ("sample-out-exists", [*SAMPLE, "--out", "old.png"], "old.png"),
    ("sample-out-proc", [*SAMPLE, "--out", "/proc/s.png"], "/proc"),
    ("sample-model-missing", ["sample", "--model", "missing_policy", "--c", "1", "--out",
                              "s.png"], "missing_policy"),
    ("sample-y", [*SAMPLE[:-2], "--y", "7", "--out", "s.png"], "y 7"),
    ("sample-c", ["sample", "--model", "{policy}", "--c", "42", "--out", "s.png"], "--c"),
    ("sample-guidance", [*SAMPLE, "--guidance-scale", "-1", "--out", "s.png"],
     "--guidance-scale"),
    # -- registry
    ("register-broken", ["registry", "register", "--policy", "broken_policy"], "adapter"),
    ("register-missing", ["registry", "register", "--policy", "missing_policy"],
     "missing_policy"),
    ("register-base-dir", ["registry", "register", "--policy", "{base}"], "base model"),
    ("register-alias-latest", ["registry", "register", "--policy", "{policy}", "--alias",
                               "latest"], "latest"),
    ("register-alias-version", ["registry", "register", "--policy", "{policy}", "--alias",
                                "v2"], "v2"),
    ("register-alias-chars", ["registry", "register", "--policy", "{policy}", "--alias",
                              "a b"], "a b"),
    ("register-name", ["registry", "register", "--policy", "{policy}", "--name", "a/b"],
     "a/b"),
    ("promote-version", ["registry", "promote", "ctrl-base-digits", "999", "champion"], "999"),
    ("promote-alias", ["registry", "promote", "ctrl-base-digits", "1", "latest"], "latest"),
    ("register-base-missing", ["registry", "register-base", "--model", "missing_base",
                               "--name", "x"], "missing_base"),
    ("register-base-alias", ["registry", "register-base", "--model", "{base}", "--name", "x",
                             "--alias", "V7"], "V7"),
    # -- baselines
    ("baseline-kind", ["baseline", "xyz", *BASELINE], "kind"),
    ("dps-reward-missing", ["baseline", "dps", *BASELINE, "--set",
                            "rewards=[{{path: missing_reward}}]"], "rewards[0].path"),
    ("dps-scale", ["baseline", "dps", *BASELINE, "--set", "guidance_scale=-1"],
     "guidance_scale"),
    ("dps-out-file", ["baseline", "dps", *BASELINE, "--set", "output_dir=NOTES"], "NOTES"),
    ("dps-judge-missing", ["baseline", "dps", *BASELINE, "--set", "judge=missing_judge"],
     "missing_judge"),
    ("cfg-pairs-label", ["baseline", "cfg", "--config", "{cfg_yaml}", "--set",
                         "pairs=[{{path: data/pairs8.parquet, label: ink_class}}]"],
     "pairs[0].label"),
    ("cg-dataset-typo", ["baseline", "cg", "--config", "{cfg_yaml}", "--set",
                         "dataset=data/typo.parquet"], "typo.parquet"),
    # -- tune
    ("tune-samples", [*TUNE, "--set", "search.num_samples=0"], "search.num_samples"),
    ("tune-metric", [*TUNE, "--set", "metric=loss"], "metric"),
    ("tune-space", [*TUNE, "--set", "search.kl_weight={{loguniform: [0, 1]}}"],
     "search.kl_weight"),
    ("tune-base-missing", [*TUNE, "--set", "finetune.base_model=missing_base"],
     "missing_base"),
    ("tune-out-file", [*TUNE, "--set", "output_dir=NOTES"], "NOTES"),
    ("tune-alias", [*TUNE, "--set", "alias=latest"], "alias"),
    ("tune-register-name", [*TUNE, "--set", "register_name=a/b"], "register_name"),
    ("tune-address", [*TUNE, "--set", "finetune.distributed.address=127.0.0.1:1"],
     "127.0.0.1:1"),
    # -- demo and text2image
    ("demo-data-not-parquet", [*DEMO, "--set", "pretrain.data.path=NOTES"], "NOTES"),
    ("demo-out-file", [*DEMO, "--set", "output_dir=NOTES"], "NOTES"),
    ("demo-iterations", [*DEMO, "--set", "finetune.iterations=0"], "finetune.iterations"),
    ("demo-batch", [*DEMO, "--set", "finetune.objective.batch_size=0"],
     "finetune.objective.batch_size"),
    ("tiny-pipeline-out", ["text2image", "tiny-pipeline", "--out", "NOTES"], "NOTES"),
    ("tiny-pipeline-exists", ["text2image", "tiny-pipeline", "--out", "existing_dir"],
     "existing_dir"),
    # -- what used to escape as a traceback, leave a run behind, or exit 0 (issue 26)
    ("config-duplicate-key", ["pretrain", "--config", "duplicate.yaml"], "output_dir"),
    ("reward-pairs-empty", [*REWARD, "--set", "pairs=data/empty-pairs.parquet"],
     "empty-pairs.parquet"),
    ("reward-dataset-typo-pairs-present", [*REWARD, "--set", "dataset=data/typo.parquet"],
     "typo.parquet"),
    ("reward-labeller-import", [*REWARD, "--set", "labeller=broken_labeller.py:label"],
     "broken_labeller.py"),
    ("reward-labeller-no-module", [*REWARD, "--set", "labeller=no_such_module:label"],
     "no_such_module"),
    ("reward-labeller-not-function", [*REWARD, "--set", "labeller=labellers.py:not_function"],
     "not_function"),
    ("reward-labeller-raises", [*REWARD, "--set", "labeller=labellers.py:raises"],
     "labellers.py:raises"),
    ("reward-labeller-length", [*REWARD, "--set", "labeller=labellers.py:wrong_length"],
     "wrong_length"),
    ("reward-labeller-class", [*REWARD, "--set", "labeller=labellers.py:outside"], "outside"),
    ("evaluate-labeller-raises", [*EVALUATE, "--set",
                                  "evaluation.scorers.compress_class=labellers.py:raises"],
     "labellers.py:raises"),
    ("evaluate-contexts", [*EVALUATE, "--set", "evaluation.contexts=[0, 42]"],
     "evaluation.contexts"),
    ("finetune-contexts", [*FINETUNE, "--set", "evaluation.contexts=[42]"],
     "evaluation.contexts"),
    ("finetune-base-empty", [*FINETUNE, "--set", "base_model=empty_base"], "empty_base"),
    ("tune-base-empty", [*TUNE, "--set", "finetune.base_model=empty_base"], "empty_base"),
    ("import-bomb", [*IMPORT, "--out", "bomb.parquet"], "bomb.png"),
    ("import-out-proc", [*IMPORT_PARQUET, "--out", "/proc/pairs.parquet"], "/proc"),
    ("import-out-long", [*IMPORT_PARQUET, "--out", f"outputs/{LONG}.parquet"], "--out"),
    ("import-out-in-images", [*IMPORT, "--out", "images/pairs.parquet"], "--out"),
]


LABELLERS = """
import numpy as np

not_function = 3


def raises(images):
    raise ValueError("the user's labeller failed")


def wrong_length(images):
    return np.zeros(len(images) - 1, dtype=np.int64)


def outside(images):
    return np.full(len(images), 99)
"""


def _empty_pairs(source: Path, out: Path) -> None:
    """A pair-set file with the metadata and columns of `source` and no rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    pq.write_table(table.slice(0, 0), out)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (no pixel data follows): PIL refuses
    it as a decompression bomb on open, as it would a real one, without the memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def _image_folder(folder: Path, csv: Path) -> None:
    """Four 8x8 images in two classes, the last one a decompression bomb."""
    from PIL import Image

    folder.mkdir()
    rows = ["file_name,label"]
    for index in range(3):
        Image.new("L", (8, 8), color=40 * index).save(folder / f"{index}.png")
        rows.append(f"{index}.png,{index % 2}")
    (folder / "bomb.png").write_bytes(_png_claiming(20_000, 20_000))
    rows.append("bomb.png,1")
    csv.write_text("\n".join(rows) + "\n")


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits8, tiny_base, tiny_reward, tiny_judge, tiny_run):
    """A user's working folder: data, configs, a notes file, folders with content, a
    previous reward, an evaluation grid, a broken policy; plus the session's models."""
    from ctrl_ray.data.digits import build_digits
    from ctrl_ray.data.pairs import make_pairs

    root = tmp_path_factory.mktemp("workspace")
    (root / "data").mkdir()
    shutil.copy(digits8, root / "data" / "d8.parquet")
    build_digits(root / "data" / "d16.parquet", size=16)
    make_pairs(root / "data" / "d8.parquet", "compress_class", 300, root / "data" /
               "pairs8.parquet")
    (root / "NOTES").write_text("my notes: do not lose\n")
    (root / "existing_dir").mkdir()
    (root / "existing_dir" / "keep.txt").write_text("keep me\n")
    (root / "old.png").write_bytes(b"\x89PNG old grid")
    (root / "eval_out").mkdir()
    (root / "eval_out" / "evaluate_grid.png").write_bytes(b"\x89PNG previous evaluation")
    shutil.copytree(tiny_reward, root / "reward_existing")
    policy = Path(tiny_run[0]) / "policy"
    shutil.copytree(policy, root / "broken_policy")
    (root / "broken_policy" / "adapter.safetensors").unlink()
    (root / "malformed.yaml").write_text("training:\n  steps: [1, 2\n  lr: 3\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00bad")
    (root / "duplicate.yaml").write_text("output_dir: outputs/a\noutput_dir: outputs/b\n")
    (root / "empty_base").mkdir()
    _empty_pairs(root / "data" / "pairs8.parquet", root / "data" / "empty-pairs.parquet")
    (root / "labellers.py").write_text(LABELLERS)
    (root / "broken_labeller.py").write_text("import no_such_package_here\n")
    _image_folder(root / "images", root / "images.csv")
    paths = {"policy": str(policy), "base": str(tiny_base.model_dir), "reward": str(tiny_reward),
             "judge": str(tiny_judge)}
    finetune = (f"base_model: {tiny_base.model_dir}\nrewards: [{{path: {tiny_reward}}}]\n"
                f"judge: {tiny_judge}\nobjective: {{batch_size: 8, num_inference_steps: 4}}\n"
                f"evaluation: {{num_inference_steps: 4}}\n"
                f"iterations: 2\noutput_dir: outputs/ctrl\n")
    paths["finetune_yaml"] = _yaml(root / "finetune.yaml", finetune)
    paths["pretrain_yaml"] = _yaml(root / "pretrain.yaml", (
        "data: {path: data/d8.parquet, size: 8}\nmodel: {image_size: 8, "
        "block_out_channels: [16, 32]}\ntraining: {steps: 5, lr: 1e-3}\n"
        "output_dir: outputs/base\n"))
    paths["reward_yaml"] = _yaml(root / "reward.yaml", (
        "dataset: data/d8.parquet\nsize: 8\nlabel: compress_class\nnum_pairs: 300\n"
        "pairs: data/pairs8.parquet\ntraining: {epochs: 1}\noutput_dir: outputs/reward\n"))
    paths["baseline_yaml"] = _yaml(root / "dps.yaml", (
        f"base_model: {tiny_base.model_dir}\nrewards: [{{path: {tiny_reward}}}]\n"
        f"judge: {tiny_judge}\noutput_dir: outputs/dps\n"))
    paths["cfg_yaml"] = _yaml(root / "cfg.yaml", (
        f"base_model: {tiny_base.model_dir}\njudge: {tiny_judge}\ndataset: data/d8.parquet\n"
        f"pairs: [{{path: data/pairs8.parquet, label: compress_class, num_pairs: 300}}]\n"
        f"output_dir: outputs/cfg\n"))
    paths["tune_yaml"] = _yaml(root / "tune.yaml", (
        f"finetune:\n  base_model: {tiny_base.model_dir}\n  rewards: [{{path: {tiny_reward}}}]\n"
        f"  judge: {tiny_judge}\n  iterations: 4\nasha: {{grace_period: 2}}\n"
        f"output_dir: outputs/tune\n"))
    paths["demo_yaml"] = _yaml(root / "demo.yaml", (
        "pretrain:\n  data: {path: data/d8.parquet, size: 8}\n  model: {image_size: 8}\n"
        "judge: {path: outputs/judge}\nreward: {dataset: data/d8.parquet, size: 8, "
        "pairs: data/pairs8.parquet, output_dir: outputs/reward}\n"
        "finetune: {output_dir: outputs/demo/ctrl}\noutput_dir: outputs/demo\n"))
    watched = [root, Path(tiny_base.model_dir), Path(tiny_reward), Path(tiny_judge),
               Path(tiny_run[0]), Path(digits8)]
    return root, paths, watched


def _snapshot(paths: list[Path]) -> dict[str, str]:
    """Every file and folder under `paths`, with the SHA-256 of each file's bytes."""
    state = {}
    for top in paths:
        items = [top] if top.is_file() else [top, *top.rglob("*")]
        for item in items:
            if item.is_file():
                state[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest()
            else:
                state[str(item)] = "dir"
    return state


def _mlflow_counts() -> tuple[int, int]:
    """(runs in any state, registered model versions) in the session's MLflow store."""
    import mlflow
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from ctrl_ray import tracking

    tracking.configure()
    client = MlflowClient()
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = 0
    if experiments:
        runs = len(mlflow.search_runs([e.experiment_id for e in experiments],
                                      run_view_type=ViewType.ALL, output_format="list"))
    return runs, len(client.search_model_versions())


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("argv", "names"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_one_line_and_loses_nothing(argv, names, workspace, capsys,
                                                           monkeypatch):
    root, paths, watched = workspace
    monkeypatch.chdir(root)
    monkeypatch.setattr(preflight, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [arg.format(**paths) for arg in argv]
    before, counts = _snapshot(watched), _mlflow_counts()
    start = time.perf_counter()
    code, out, err = _run(argv, capsys)
    seconds = time.perf_counter() - start
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("ctrl-ray"), err
    assert names.format(**paths) in err, err
    assert "Traceback" not in out + err
    assert _snapshot(watched) == before
    assert _mlflow_counts() == counts
    assert seconds < 30, f"took {seconds:.0f} s: bad input must fail before any heavy work"


def test_table_covers_every_subcommand():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)
    firsts = {tuple(a for a in case[1][:2] if not a.startswith("-")) for case in CASES}
    commands = {f[0] for f in firsts}
    assert commands >= {"demo", "data", "pretrain", "reward", "finetune", "evaluate", "baseline",
                        "tune", "registry", "sample", "text2image"}


def test_overwrite_replaces_only_when_asked(workspace, capsys, monkeypatch):
    """The same command that refused an existing output replaces it with --overwrite."""
    root, _, _ = workspace
    monkeypatch.chdir(root)
    out = root / "replace-me.parquet"
    out.write_bytes(b"old")
    code, _, err = _run(["data", "build-digits", "--size", "8", "--out", str(out)], capsys)
    assert code == 2 and out.read_bytes() == b"old"
    code, _, _ = _run(["data", "build-digits", "--size", "8", "--out", str(out),
                       "--overwrite"], capsys)
    assert code == 0 and out.read_bytes()[:4] == b"PAR1"
    assert not [p for p in root.iterdir() if p.name.startswith(".replace-me")]
    out.unlink()


def test_silent_server_fails_in_bounded_time():
    """A server that accepts the connection but never answers fails within the timeout."""
    import socket

    from ctrl_ray.errors import InputError

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.perf_counter()
        with pytest.raises(InputError, match=f"{address}.*no answer within 1 s"):
            preflight.check_cluster_address(address, "--address", timeout_s=1.0)
        assert time.perf_counter() - start < 5


def test_output_checks_name_every_problem(tmp_path):
    from ctrl_ray.errors import InputError

    (tmp_path / "f").write_text("x")
    os.chmod(tmp_path, 0o755)
    ok = preflight.check_output(tmp_path / "new" / "deeper", "out", kind="dir")
    assert ok == tmp_path / "new" / "deeper" and not (tmp_path / "new").exists()
    assert preflight.check_output(tmp_path / "f", "out", kind="file", overwrite=True)
    for path, kind, message in [
        (tmp_path / "f", "dir", "is a file"),
        (tmp_path, "file", "is a folder"),
        (tmp_path / "f" / "x", "dir", "is a file"),
        ("/sys/kernel/x", "dir", "/sys"),
        ("", "file", "empty"),
    ]:
        with pytest.raises(InputError, match=message):
            preflight.check_output(path, "out", kind=kind)


@pytest.mark.parametrize("argv", [
    ["demo", "--set", "output_dir=NOTES"],
    ["sample", "--model", "models:/ctrl-digits@champion", "--c", "1", "--out", "s.png"],
    ["registry", "promote", "ctrl-digits", "1", "latest"],
    ["registry", "list"],
], ids=["demo", "sample-uri", "promote", "list"])
def test_a_fresh_folder_gets_no_mlflow_store_from_bad_input(argv, tmp_path, capsys,
                                                             monkeypatch):
    """Without MLFLOW_TRACKING_URI the store is ./mlflow.db; bad input must not create it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "NOTES").write_text("notes\n")
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES"]


def test_ray_address_from_the_environment_is_probed_too(workspace, capsys, monkeypatch):
    root, paths, watched = workspace
    monkeypatch.chdir(root)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    before = _snapshot(watched)
    code, _, err = _run(["finetune", "--config", paths["finetune_yaml"], "--workers", "1"],
                        capsys)
    assert code == 2 and err.count("\n") == 1
    assert "RAY_ADDRESS" in err and "127.0.0.1:1" in err
    assert _snapshot(watched) == before


def test_registry_list_refuses_a_store_that_does_not_exist(tmp_path, capsys, monkeypatch):
    """A mistyped MLFLOW_TRACKING_URI is named, not created as an empty store."""
    store = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    code, out, err = _run(["registry", "list"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(store) in err, err
    assert "MLFLOW_TRACKING_URI" in err and not out
    assert list(tmp_path.iterdir()) == []


def test_a_stale_cluster_file_does_not_make_a_run_wait(workspace, tmp_path):
    """With no --address and no RAY_ADDRESS a run starts its own Ray, even when Ray's temp folder
    still names a head that died without `ray stop` (ray.init() alone would join it and retry
    for good)."""
    import socket
    import subprocess
    import sys
    import tempfile

    root, paths, _ = workspace
    ray_tmp = Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))  # socket paths: short
    with socket.socket() as probe:  # a port nothing listens on: the dead head's
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "ctrl_ray.cli", "finetune", "--config",
               paths["finetune_yaml"], "--workers", "1", "--set", "iterations=1", "--set",
               "evaluate=false", "--set", "optimum_samples_per_context=0", "--set",
               "objective.calibration_rollouts=0", "--set", "objective.final_fit_steps=0",
               "--set", f"output_dir={tmp_path / 'run'}"]
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert dead not in done.stderr + done.stdout
    assert (tmp_path / "run" / "policy").is_dir()
