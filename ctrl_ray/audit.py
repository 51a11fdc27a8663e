"""`ctrl-ray reward audit`: what a reward can buy, and at what KL, before any training.

Loads the base model and the reward(s) as a fine-tuning run would, estimates the exact optimum
p_pre(x | c) p(y | x, c)^(gamma / alpha) at each guidance level by importance weighting of base
samples (`ctrl_ray.optimum`), prints the table, and writes it as JSON with a sample grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ctrl_ray import preflight
from ctrl_ray.finetune_setup import FinetuneConfig, RewardSpec, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.text_to_image import TextToImageOptions
from ctrl_ray.optimum import OptimumConfig, exact_optimum, format_optimum
from ctrl_ray.storage import atomic_directory, write_json


@dataclass
class AuditConfig:
    """The base model, the reward(s) and the fidelity judge (as in a finetune config), and the
    importance-sampling estimate."""

    base_model: str = "outputs/base-digits16"
    backbone: TextToImageOptions = field(default_factory=TextToImageOptions)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    judge: str = "outputs/judge-digits16"
    optimum: OptimumConfig = field(default_factory=OptimumConfig)
    output_dir: str = "outputs/audit"


def check_audit(config: AuditConfig, overwrite: bool = False) -> None:
    """Every input exists and the output folder is free (or ``overwrite``), before any work."""
    preflight.check_model_ref(config.base_model, "base_model")
    inputs = [("base_model", config.base_model)]
    for i, reward in enumerate(config.rewards):
        preflight.check_input_dir(reward.path, f"rewards[{i}].path")
        inputs.append((f"rewards[{i}].path", reward.path))
    if config.judge:
        preflight.check_input_dir(config.judge, "judge")
        inputs.append(("judge", config.judge))
    preflight.check_output(config.output_dir, "output_dir", kind="dir", inputs=inputs,
                           overwrite=overwrite)


def run_audit(config: AuditConfig, overwrite: bool = False) -> dict:
    """Estimate the optimum at every guidance level; write `audit.json` and `optimum_grid.png`
    into `output_dir` (moved into place when both are written)."""
    check_audit(config, overwrite)
    setup = build_setup(FinetuneConfig(base_model=config.base_model, backbone=config.backbone,
                                       rewards=config.rewards, judge=config.judge))
    judge = DigitJudge.load(config.judge) if config.judge else None
    setup.model.eval()
    with atomic_directory(config.output_dir) as tmp:
        result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                               config.optimum, grid_path=tmp / "optimum_grid.png")
        result["grid"] = str(Path(config.output_dir) / "optimum_grid.png")
        write_json(tmp / "audit.json", result)
    print(format_optimum(result))
    return result
