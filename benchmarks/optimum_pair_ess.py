"""The optimum's effective sample size per (digit, target) pair, per sample drawn: from base
samples, or (`--proposal`) from a trained policy's samples drawn for each pair, weighted by
p(y | x0, c)^lambda p_pre / q of their paths. 50 / (ESS per sample) is what an ESS of 50 costs
at that pair; `goal_yardstick.py` tops the base samples up and hands the pairs still short to a
policy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimum_pair_ess.py \
        --reward outputs/bench-frontier3/reward-compress_class --tilt 10 --samples 1000 \
        [--proposal POLICY_DIR --contexts 1]

Prints one line per pair, the shortest first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import testbed_parser  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.optimum import base_pool, normalised, proposal_pool  # noqa: E402
from ctrl_ray.optimum_config import OptimumConfig  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402


def main() -> None:
    parser = testbed_parser(__doc__, "base", "judge", base="outputs/base-digits16-demo")
    parser.add_argument("--reward", required=True)
    parser.add_argument("--tilt", type=float, default=10.0, help="gamma / alpha")
    parser.add_argument("--samples", type=int, default=1000,
                        help="base samples per digit, or the proposal's per pair")
    parser.add_argument("--proposal", default=None, help="a trained policy's directory")
    parser.add_argument("--contexts", type=int, nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setup = build_setup(load_config(FinetuneConfig, overrides=[
        f"base_model={args.base}", f"judge={args.judge}", f"rewards=[{{path: {args.reward}}}]"]))
    setup.model.eval()
    config = OptimumConfig(samples_per_context=args.samples, contexts=args.contexts,
                           guidance_levels=[args.tilt], num_inference_steps=20)
    judge = DigitJudge.load(args.judge)
    pool = (base_pool(setup.model, setup.label_info, setup.image_log_likelihood, judge, config)
            if args.proposal is None else
            proposal_pool(load_any(args.proposal).model.eval(), setup.label_info,
                          setup.image_log_likelihood, judge, config))
    rows = []
    for index, target in enumerate(pool.log_likelihood):
        for c in pool.contexts:
            drawn = pool.rows(c, index)
            ess = float(1.0 / (normalised(pool.log_weights(target, drawn, args.tilt))**2).sum())
            rows.append((ess / len(drawn), c, target, ess, len(drawn)))
    source = "base samples" if args.proposal is None else f"{args.proposal}'s samples"
    print(f"ESS per pair at gamma/alpha {args.tilt:g} from {source}")
    for fraction, c, target, ess, drawn in sorted(rows):
        print(f"c = {c} / y = {target}: ESS {ess:.1f} of {drawn} ({fraction:.4f} per sample; "
              f"ESS 50 at about {50 / fraction:,.0f})")


if __name__ == "__main__":
    main()
