"""The config of `ctrl-ray reward audit` and its input checks, without torch: read and checked
before any heavy import (`ctrl_ray.audit` estimates the optimum from it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctrl_ray import preflight
from ctrl_ray.finetune_config import RewardSpec
from ctrl_ray.models.text_to_image_options import TextToImageOptions
from ctrl_ray.optimum_config import OptimumConfig


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
