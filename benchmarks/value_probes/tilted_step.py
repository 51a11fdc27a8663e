"""Probe: the value policy's step as the tilted transition's mean instead of the first-order
step. The optimum's step from x_k draws x' ~ N(mu, sigma^2) h(x') / E[h]; the current policy
shifts mu by sigma^2 grad log h(mu), exact only where log h is linear over a sigma-ball. Here the
shift is estimated from M base candidates x'_m = mu + sigma eps_m: 'snis' = sum_m w_m sigma eps_m,
'smoothed' = sigma^2 sum_m w_m grad log h(x'_m), w = softmax(log h(x'_m)). Evaluated on a trained
head (no retraining): macro-F1 and KL on the validation seeds, and KL per step.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/tilted_step.py POLICY_DIR \
        [steps=S] [VARIANT:M:SCALE ...]      (VARIANT: first, snis, smoothed; or "product")
"""

from __future__ import annotations

import sys
import types

import torch

sys.path.insert(0, "benchmarks")
from text2image_control import PROMPT_SETS, SAMPLES_PER_TARGET, VALIDATION_SEED  # noqa: E402

from ctrl_ray.evaluation import EvaluationConfig, evaluate  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402


def log_value(head, x, t, contexts, labels):
    names = list(head.spec.label_classes)
    targets = torch.tensor(head.spec.targets)
    rows = torch.stack([labels[name].long() for name in names], 1)
    null = rows == torch.tensor([head.spec.label_classes[n] for n in names])
    consistent = ((targets[None] == rows[:, None]) | null[:, None]).all(-1)
    log_q, log_m = head(x, t, contexts)
    return torch.logsumexp(log_q.masked_fill(~consistent, float("-inf")), 1) + log_m


def tilted_shift(variant: str, candidates: int, scale: float, generator: torch.Generator,
                 first_order):
    def mean_shift(self, mean, sigma, t, next_t, context, labels, offsets=None):
        if self.value_head is None or self._reference_mode or int(t) < self.min_timestep:
            return None
        if variant == "first":
            return scale * first_order(mean, sigma, t, next_t, context, labels)
        head, size = self.value_head, mean.shape[0]
        ctx = self.head_context(context)
        half = torch.randn((candidates // 2, *mean.shape), generator=generator)
        eps = torch.cat([half, -half])   # antithetic: the candidates' mean is exactly mu
        x = (mean[None] + sigma * eps).flatten(0, 1)
        rep = lambda v: None if v is None else v.repeat(candidates, *[1] * (v.dim() - 1))  # noqa: E731
        with torch.enable_grad():
            x = x.detach().requires_grad_(variant == "smoothed")
            values = log_value(head, x, next_t, rep(ctx), {k: rep(v) for k, v in labels.items()})
            grad = torch.autograd.grad(values.sum(), x)[0] if variant == "smoothed" else None
        w = torch.softmax(values.detach().view(candidates, size), 0).view(
            candidates, size, *[1] * (mean.dim() - 1))
        if variant == "smoothed":
            return scale * sigma**2 * (w * grad.view(candidates, *mean.shape)).sum(0)
        return scale * sigma * (w * eps).sum(0)
    return mean_shift


def recording(shift_fn, per_step: dict):
    """Wrap a mean shift to sum each step's KL, |shift|^2 / (2 sigma^2), by timestep."""
    def mean_shift(mean, sigma, t, next_t, context, labels, *rest):
        shift = shift_fn(mean, sigma, t, next_t, context, labels, *rest)
        if shift is not None:
            kl = (shift.flatten(1) ** 2).sum(1) / (2 * sigma**2)
            total, count = per_step.get(int(t), (0.0, 0))
            per_step[int(t)] = (total + float(kl.sum()), count + len(kl))
        return shift
    return mean_shift


def main() -> None:
    torch.set_num_threads(1)
    policy_dir, variants = sys.argv[1], sys.argv[2:] or ["first"]
    steps = int(variants.pop(0)[len("steps="):]) if variants[0].startswith("steps=") else 20
    judge = DigitJudge.load("outputs/judge-digits16")
    config = EvaluationConfig(samples_per_target=SAMPLES_PER_TARGET,
                              contexts=PROMPT_SETS["training"], context_digits=list(range(10)),
                              num_inference_steps=steps, seed=VALIDATION_SEED,
                              allow_other_chain=steps != 20)
    print("| variant | macro-F1 | KL | KL of steps 1, 2, 3, rest |")
    print("|---|---|---|---|")
    for spec in variants:
        loaded = load_any(policy_dir)
        model = loaded.model.eval()
        per_step: dict = {}
        if spec != "product":   # "product": the policy's own step (its step_candidates)
            variant, m, scale = (spec.split(":") + ["0", "1"])[:3]
            model.mean_shift = types.MethodType(
                tilted_shift(variant, int(m), float(scale), torch.Generator().manual_seed(1),
                             model.mean_shift), model)
        model.mean_shift = recording(model.mean_shift, per_step)
        report = evaluate(model, loaded.label_info, judge, config)
        steps = [total / count for _, (total, count) in sorted(per_step.items(), reverse=True)]
        print(f"| {spec} | {report['macro_f1']:.3f} | {report['mean_kl']:.2f} | "
              f"{steps[0]:.2f}, {steps[1]:.2f}, {steps[2]:.2f}, {sum(steps[3:]):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
