"""Probe: is the value head short of data or of capacity on the text testbed? Trains the ink
config (seed 0) with one change and scores its checkpoints on the VALIDATION seed with the
training prompts, next to the baseline run of benchmarks/text2image_control.py (read from
outputs/bench-text2image/ink-seed0). Writes benchmarks/results/head_data_NAME.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/head_data.py NAME key=value ...

e.g. `batch128 objective.batch_size=128 objective.replay_rollouts=16384`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from common import machine, publish  # noqa: E402
from text2image_control import CONFIG, VALIDATION_SEED, evaluation  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, finetune  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402

name, overrides = sys.argv[1], sys.argv[2:]
out = Path("outputs/probe-head") / name
config = load_config(FinetuneConfig, CONFIG, [
    "seed=0", "evaluate=false", "optimum_samples_per_context=0", "experiment=ctrl-ray-probe",
    f"output_dir={out}", *overrides])
start = time.perf_counter()
if not (out / "policy").is_dir():
    finetune(config, progress=False, resume="if-present")
print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
judge = DigitJudge.load(config.judge)
rows = []
baseline = Path(f"outputs/bench-text2image/ink-seed{config.seed}/checkpoints")
for label, checkpoints in ((name, out / "checkpoints"), ("baseline", baseline)):
    for checkpoint in sorted(p for p in checkpoints.iterdir() if p.name.isdigit()):
        report = evaluation(checkpoint, "training", VALIDATION_SEED, judge)
        rows.append({"run": label, "updates": int(checkpoint.name),
                     "macro_f1": report["macro_f1"], "kl": report["mean_kl"]})
        print(rows[-1], flush=True)
lines = [f"# Value head probe on the text testbed: {name}", "",
         f"`python benchmarks/value_probes/head_data.py {' '.join(sys.argv[1:])}` on "
         f"{machine()['date']}: configs/ctrl_text2image_ink.yaml, seed {config.seed}, with "
         f"`{' '.join(overrides)}`, against the same config's run in "
         f"outputs/bench-text2image/ink-seed{config.seed} (batch 32); VALIDATION evaluation seed "
         f"{VALIDATION_SEED}, training prompts, 8 samples per (ink class, prompt). The exact "
         "optimum on these prompts: 0.950 at 1.36 nats (text2image_control.md).", "",
         "| run | updates | base rollouts | macro-F1 | KL (nats) |", "|---|---|---|---|---|"]
for row in rows:
    batch = config.objective.batch_size if row["run"] == name else 32
    lines.append(f"| {row['run']} | {row['updates']} | {row['updates'] * batch:,} | "
                 f"{row['macro_f1']:.3f} | {row['kl']:.2f} |")
publish(f"head_data_{name}", {"machine": machine(), "overrides": overrides, "rows": rows},
        lines)
