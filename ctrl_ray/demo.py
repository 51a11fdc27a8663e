"""`ctrl-ray demo`: the end-to-end main job on the embedded default (local Ray, SQLite MLflow)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ctrl_ray import registry
from ctrl_ray.classifier_training import train_digit_judge
from ctrl_ray.data.digits import DigitsDataset, ensure_digits
from ctrl_ray.data.oracles import label_images
from ctrl_ray.demo_config import DemoConfig, DemoSamplingConfig, JudgeConfig
from ctrl_ray.evaluation import class_histogram, generate, save_grid
from ctrl_ray.finetune import finetune
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.loading import BaseModel, build_backbone
from ctrl_ray.policy import sample_grid
from ctrl_ray.pretrain import pretrain
from ctrl_ray.registry import load_base_model
from ctrl_ray.reward_training import train_reward_job
from ctrl_ray.storage import write_json


def run_demo(config: DemoConfig, overwrite: bool = False) -> dict:
    """Data -> judge -> base model -> its samples -> N pairs -> reward -> CTRL -> evaluation."""
    start = time.perf_counter()
    out = Path(config.output_dir)
    data_cfg = config.pretrain.data
    print(f"[1/6] digits testbed: {data_cfg.path}")
    dataset = ensure_digits(data_cfg.path, size=data_cfg.size, seed=data_cfg.seed)
    print(f"      {len(dataset)} images {dataset.image_shape}, labels "
          f"{', '.join(dataset.label_info)}")

    print(f"[2/6] fidelity judge: {config.judge.path}")
    judge, judge_accuracy = ensure_judge(dataset, config.judge)
    print(f"      test accuracy on real digits: {judge_accuracy:.3f}")

    print("[3/6] base model p_pre(x | c)")
    base, base_uri = ensure_base_model(config)
    print(f"      {base_uri}")

    print("[4/6] sampling the base model")
    report = sample_report(base, dataset, judge, config.sampling, out / "base_grid.png")
    print(f"      fidelity (judge accuracy vs requested digit): {report['fidelity']:.3f}")
    for name, histogram in report["histograms"].items():
        print(f"      {name} histogram of samples: {histogram} (real: "
              f"{report['real_histograms'][name]})")
    print(f"      grid (rows = digit c): {report['grid']}")

    reward_cfg = config.reward
    print(f"[5/6] reward p({reward_cfg.label} | x0) from {reward_cfg.num_pairs} labelled pairs")
    reward = train_reward_job(reward_cfg, progress=False)
    print(f"      test accuracy {reward['test_accuracy']:.3f} (chance 0.25), "
          f"temperature {reward['temperature']:.2f}")

    finetune_cfg = config.finetune
    workers = finetune_cfg.distributed.workers
    print(f"[6/6] CTRL fine-tuning ({finetune_cfg.mode}, "
          f"{f'{workers} Ray rollout workers' if workers else 'one process'})")
    finetune_cfg.base_model = base_uri
    ctrl = finetune(finetune_cfg, overwrite=overwrite)

    model_uri = registry.register_policy(ctrl["policy_dir"], config.registered_model, "champion")
    pulled = sample_grid(f"models:/{config.registered_model}@champion", context=3, label=0,
                         count=8, seed=0, out=out / "registry_sample_c3_y0.png")
    print(f"registered {model_uri} as @champion; pulled 8 samples (c=3, y=0) -> {pulled}")

    summary = {
        "base_model": base_uri,
        "judge_test_accuracy": judge_accuracy,
        "base_samples": report,
        "reward": reward,
        "ctrl": {k: ctrl[k] for k in ("policy_dir", "train_seconds", "base", "ctrl", "optimum")
                 if k in ctrl},
        "registered_model": model_uri,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "report.json", summary)
    print(f"\nreport: {out / 'report.json'}  (demo took {summary['seconds']:.0f} s)")
    return summary


def ensure_judge(dataset: DigitsDataset, config: JudgeConfig) -> tuple[DigitJudge, float]:
    """Load the judge at `config.path`, or train it on the train split; its test accuracy."""
    path = Path(config.path)
    if (path / "config.json").exists():
        judge = DigitJudge.load(path)
    else:
        train = dataset.subset("train")
        judge, _ = train_digit_judge(train.images, train.digits, seed=config.seed,
                                     epochs=config.epochs)
        judge.save(path)
    test = dataset.subset("test")
    return judge, judge.fidelity(test.images, test.digits)


def ensure_base_model(config: DemoConfig) -> tuple[BaseModel, str]:
    """Pull the newest registered base model if it fits the data, else pre-train one.

    Returns the model and where it lives (a `models:/` URI, or its directory).
    """
    name = config.pretrain.registered_model
    if config.reuse_registered_base and name:
        version = registry.latest_version(name)
        if version is not None:
            uri = f"models:/{name}/{version}"
            base = load_base_model(uri)
            if base.image_shape[-1] == config.pretrain.model.image_size:
                print(f"      pulled {uri} from the registry")
                return base, uri
    result = pretrain(config.pretrain)
    print(f"      trained in {result.seconds:.0f} s (final loss {result.final_loss:.4f}); "
          f"registered {result.model_uri}")
    return load_base_model(result.model_dir), result.model_uri or str(result.model_dir)


def sample_report(base: BaseModel, dataset: DigitsDataset, judge: DigitJudge,
                  config: DemoSamplingConfig, grid_path: Path) -> dict:
    """Sample every digit, judge fidelity, label with the oracles, write the grid."""
    model = AugmentedModel(build_backbone(base), {}, adapter="none")
    digits = torch.arange(base.num_contexts).repeat_interleave(config.samples_per_digit)
    start = time.perf_counter()
    seeds = config.seed + torch.arange(len(digits))
    images, _ = generate(model, digits, {}, seeds.tolist(),
                         num_inference_steps=config.num_inference_steps, eta=config.eta,
                         from_reference=True)
    seconds = time.perf_counter() - start
    train = dataset.subset("train")
    histograms, real = {}, {}
    for name, info in dataset.label_info.items():
        classes = label_images(images.numpy(), name, info["edges"])
        histograms[name] = class_histogram(classes, info["num_classes"])
        real[name] = class_histogram(train.labels[name], info["num_classes"])
    save_grid(images, rows=base.num_contexts, path=grid_path,
              row_labels=[f"c = {c}" for c in range(base.num_contexts)],
              column_labels=[f"sample {i + 1}" for i in range(config.samples_per_digit)],
              title="the base model p_pre(x | c): no y")
    return {
        "fidelity": judge.fidelity(images.numpy(), digits.numpy()),
        "num_samples": len(images),
        "sampling_seconds": round(seconds, 2),
        "histograms": histograms,
        "real_histograms": real,
        "grid": str(grid_path),
        "mean_pixel": float(np.mean(images.numpy())),
    }
