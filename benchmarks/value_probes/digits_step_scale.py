"""Probe: the digits default's policies (benchmarks/default_rule_speed.py, setting 4, seeds 0-2)
sampled with their value head's step multiplied by each SCALE, on one evaluation seed (4 samples
per (ink class, digit)); prints macro-F1 and KL per seed and their means.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/digits_step_scale.py \
        EVAL_SEED SCALE [SCALE ...]
"""

import statistics
import sys

import torch

from ctrl_ray.evaluation import EvaluationConfig, evaluate
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.policy import load_any

torch.set_num_threads(1)
judge = DigitJudge.load("outputs/judge-digits16")
evaluation_seed, scales = int(sys.argv[1]), [float(s) for s in sys.argv[2:]]
config = EvaluationConfig(samples_per_target=4, num_inference_steps=20, seed=evaluation_seed)
for scale in scales:
    scores, kls = [], []
    for seed in (0, 1, 2):
        loaded = load_any(f"outputs/default-rule-speed/s{seed}-4/policy")
        loaded.model.value_head.spec.step_scale = scale
        report = evaluate(loaded.model, loaded.label_info, judge, config)
        scores.append(report["macro_f1"])
        kls.append(report["mean_kl"])
    print(f"step x {scale}: macro-F1 {[round(s, 3) for s in scores]} at KL "
          f"{[round(k, 2) for k in kls]}; mean {statistics.mean(scores):.3f} at "
          f"{statistics.mean(kls):.2f}", flush=True)
