"""`ctrl-ray demo` end to end on a tiny 8x8 setting (2 Ray rollout workers)."""

from __future__ import annotations

import json

from ctrl_ray.cli import main
from ctrl_ray.grids import grid_labels


def test_demo_runs_every_stage_and_pulls_from_the_registry(digits8, tiny_base, ray_session,
                                                            tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        f"pretrain.data.path={digits8}", "pretrain.data.size=8", "pretrain.model.image_size=8",
        "pretrain.model.block_out_channels=[16, 32]",
        f"judge.path={tmp_path}/judge", "judge.epochs=2",
        "sampling.samples_per_digit=1", "sampling.num_inference_steps=4",
        f"reward.dataset={digits8}", "reward.size=8", "reward.num_pairs=200",
        f"reward.pairs={tmp_path}/pairs.parquet", "reward.training.epochs=3",
        f"reward.output_dir={tmp_path}/reward",
        f"finetune.rewards=[{{path: {tmp_path}/reward}}]", f"finetune.judge={tmp_path}/judge",
        "finetune.objective.batch_size=4", "finetune.objective.num_inference_steps=4",
        "finetune.iterations=2", "finetune.checkpoint_every=0",
        "finetune.objective.final_fit_steps=20",
        "finetune.evaluation.samples_per_target=1", "finetune.evaluation.contexts=[0]",
        "finetune.evaluation.num_inference_steps=4", "finetune.distributed.workers=2",
        "finetune.optimum_samples_per_context=8", "finetune.optimum_max_samples_per_context=400",
        f"finetune.output_dir={out}/ctrl", "registered_model=ctrl-digits-demo",
        f"output_dir={out}",
    ]
    code = main(["demo", "--config", "configs/demo.yaml",
                 *[arg for o in overrides for arg in ("--set", o)]])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "pulled models:/ctrl-base-digits/" in printed  # the session's 8x8 base model
    assert "fidelity" in printed and "CTRL fine-tuned" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["registered_model"] == "models:/ctrl-digits-demo/1"
    assert 0.0 <= report["ctrl"]["ctrl"]["macro_f1"] <= 1.0
    assert "exact optimum" in printed and report["ctrl"]["optimum"]["gamma_over_alpha"] == 1.0
    # 8 samples cannot carry an ESS of 50 (ESS <= M): the low contexts were topped up.
    assert report["ctrl"]["optimum"]["ess_min"] >= 50 and "warning" not in printed
    assert grid_labels(out / "base_grid.png") == {
        "rows": [f"c = {c}" for c in range(10)], "columns": ["sample 1"],
        "title": "the base model p_pre(x | c): no y"}
    assert grid_labels(out / "registry_sample_c3_y0.png")["title"] == "c = 3"
    assert grid_labels(out / "ctrl" / "ctrl_grid.png")["columns"] == ["c = 0"]
