"""Does the value policy want a different step scale early and late in the chain?

The head is fit worst at high noise (its held-out loss there is near the constant head's), and a
regression on noisy targets is shrunk toward the constant, so one scale for every step may be
too small early and too large late. This probe multiplies a saved value policy's mean shift by
one factor per segment of the chain (first, middle and last third of the steps; x_T's tilt goes
with the first) and measures CTRL's objective J on the same fresh rollouts for each, one
segment at a time, then for the best factors together, with the optimum's J* beside them (J* - J
is kl_weight KL(pi || pi*)).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/segment_scale.py CONFIG POLICY \
        [--set key=value ...] [--factors 0.7 1.4 2] [--rollouts 256] [--seed 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from policy_objective import objective, optimum_objective  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.models.augmented import AugmentedModel  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402

SEGMENTS = ("early", "middle", "late")


def segment_of(t: int, num_train_timesteps: int) -> str:
    """Which third of the chain a step at timestep t belongs to."""
    return SEGMENTS[min(2, int(3 * (num_train_timesteps - 1 - t) / num_train_timesteps))]


def scaled(factors: dict[str, float], num_train_timesteps: int):
    """`AugmentedModel.mean_shift` and `initial_shift` with the segment's factor applied."""
    mean_shift, initial_shift = AugmentedModel.mean_shift, AugmentedModel.initial_shift

    def shifted(self, mean, sigma, t, next_t, *args, **kwargs):
        shift = mean_shift(self, mean, sigma, t, next_t, *args, **kwargs)
        factor = factors[segment_of(int(t), num_train_timesteps)]
        return None if shift is None else factor * shift

    def initial(self, x_t, t, *args, **kwargs):
        shift = initial_shift(self, x_t, t, *args, **kwargs)
        return None if shift is None else factors["early"] * shift
    return shifted, initial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policy")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.7, 1.4, 2.0])
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)
    inputs = draw_inputs(setup.model, dataclasses.replace(config.objective,
                                                          batch_size=args.rollouts), args.seed)
    best_j = optimum_objective(args.config, args.overrides, inputs,
                               setup.model.label_classes)
    model = load_any(args.policy).model.eval()
    steps = len(model.alphas_cumprod)
    originals = AugmentedModel.mean_shift, AugmentedModel.initial_shift

    def measure(factors: dict[str, float]) -> float:
        AugmentedModel.mean_shift, AugmentedModel.initial_shift = scaled(factors, steps)
        try:
            row = objective(model, setup.reward_fn, config.objective, inputs)
        finally:
            AugmentedModel.mean_shift, AugmentedModel.initial_shift = originals
        print(f"  {factors}: J {row['objective']:.3f} +- {row['objective_se']:.3f}, E[log p] "
              f"{row['log_likelihood']:.3f}, KL {row['kl']:.2f}, J* - J "
              f"{best_j - row['objective']:.3f}", flush=True)
        return row["objective"]

    print(f"{args.policy} (scale x{model.value_head.spec.step_scale:g} as saved); J* {best_j:.3f}"
          f" on the same {args.rollouts} rollouts", flush=True)
    unit = dict.fromkeys(SEGMENTS, 1.0)
    baseline = measure(unit)
    best = dict(unit)
    for segment in SEGMENTS:
        scores = {1.0: baseline}
        for factor in args.factors:
            scores[factor] = measure({**unit, segment: factor})
        best[segment] = max(scores, key=scores.get)
    if best != unit:
        measure(best)


if __name__ == "__main__":
    main()
