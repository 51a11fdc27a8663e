"""Probe: does CTRL's own objective choose the value head's step scale? For each policy and
scale s, sample every (y, c) on one evaluation seed and measure the objective
J(s) = gamma E[log p(y | x0, c)] - kl_weight KL (the training reward's log-likelihood), next to
the held-out scorer's macro-F1 and the KL. Since J(pi*) - J(pi) = kl_weight KL(pi || pi*), the
scale with the largest J is the policy closest to the exact optimum in that family.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/step_scale_objective.py \
        CONFIG EVAL_SEED --policies DIR ... --scales 1 1.2 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from sklearn.metrics import f1_score

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import generate, resolve_contexts
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.policy import load_any
from ctrl_ray.scoring import get_scorer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("seed", type=int)
    parser.add_argument("--policies", nargs="+", required=True)
    parser.add_argument("--scales", type=float, nargs="+", required=True)
    parser.add_argument("--samples", type=int, default=4, help="per (y, c)")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup, objective = build_setup(config), config.objective
    table = {}
    for path in args.policies:
        loaded = load_any(path)
        model, (name,) = loaded.model.eval(), list(loaded.model.label_classes)
        scorer = get_scorer(name, loaded.label_info[name])
        contexts, _ = resolve_contexts(model, config.evaluation.contexts,
                                       config.evaluation.context_digits)
        rows = [(y, c) for y, c in itertools.product(range(model.label_classes[name]),
                                                     contexts)
                for _ in range(args.samples)]
        labels = {name: torch.tensor([y for y, _ in rows])}
        context_tensor = torch.tensor([c for _, c in rows])
        for scale in args.scales:
            model.value_head.spec.step_scale = scale
            images, kl = generate(model, context_tensor, labels,
                                  [args.seed + i for i in range(len(rows))],
                                  num_inference_steps=objective.num_inference_steps,
                                  eta=objective.eta, compute_kl=True)
            with torch.no_grad():
                log_p = setup.image_log_likelihood(images, labels, context_tensor)
            score = f1_score(labels[name].numpy(), scorer.label(images), average="macro")
            value = objective.gamma * log_p.mean().item() - \
                objective.kl_weight * kl.mean().item()
            table.setdefault(scale, []).append((value, score, kl.mean().item(),
                                                log_p.mean().item()))
            print(f"{path} x{scale}: J {value:.3f} macro-F1 {score:.3f} KL "
                  f"{kl.mean().item():.2f} log p {log_p.mean().item():.3f}", flush=True)
    print("| scale | J | macro-F1 | KL | log p |\n|---|---|---|---|---|")
    for scale, cells in table.items():
        means = [statistics.mean(cell[i] for cell in cells) for i in range(4)]
        print(f"| {scale} | {means[0]:.3f} | {means[1]:.3f} | {means[2]:.2f} | {means[3]:.3f} |")


if __name__ == "__main__":
    main()
