"""`ctrl-ray reward audit`: what a reward can buy, and at what KL, before any training.

Loads the base model and the reward(s) as a fine-tuning run would, estimates the exact optimum
p_pre(x | c) p(y | x, c)^(gamma / alpha) at each guidance level by importance weighting of base
samples (`ctrl_ray.optimum`), prints the table, and writes it as JSON with a sample grid.
"""

from __future__ import annotations

from pathlib import Path

from ctrl_ray.audit_config import AuditConfig, check_audit
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.optimum import exact_optimum, format_optimum
from ctrl_ray.storage import atomic_directory, write_json


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
