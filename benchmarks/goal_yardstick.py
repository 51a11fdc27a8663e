"""The goal table's yardstick for the frontier's tasks, at each task's own gamma/alpha only,
its base samples per digit topped up until every target's ESS is at least 50 (or a cap).
`frontier.py` estimates the optimum at four guidance levels from at most 1,000 base samples
per digit, which leaves the compress x ink pair at an ESS of 3 at gamma/alpha 1; a single
level can take many more samples where only it needs them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/goal_yardstick.py [--tasks multi] \
        [--max-samples 32000] [--out outputs/bench-frontier-fit3000]

Uses the rewards the frontier trained under --out (the same pairs and seeds). Writes
benchmarks/results/goal_yardstick.{json,md}; each task's estimate is cached under --out, and
`default_goal.py` takes it where its ESS is the higher.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, testbed_parser, write_results  # noqa: E402
from frontier import LABELS, TILT, _optimum  # noqa: E402


def main() -> None:
    parser = testbed_parser(__doc__, "base", "judge", base="outputs/base-digits16-demo")
    parser.add_argument("--tasks", nargs="+", default=["multi"], choices=list(LABELS))
    parser.add_argument("--optimum-samples", type=int, default=300)
    parser.add_argument("--max-samples", type=int, default=32000, dest="optimum_max_samples",
                        help="base samples per digit at most")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="outputs/bench-frontier-fit3000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    missing = [str(out / f"reward-{label}") for task in args.tasks for label in LABELS[task]
               if not (out / f"reward-{label}").is_dir()]
    if missing:
        parser.error(f"no trained reward at {', '.join(missing)}: run frontier.py with this "
                     "--out first")
    tasks = {}
    for task in args.tasks:
        path = out / task / f"yardstick-max{args.optimum_max_samples}.json"
        if not path.is_file():
            rewards = [str(out / f"reward-{label}") for label in LABELS[task]]
            start = time.perf_counter()
            result = _optimum(task, rewards, args, levels=[TILT[task]])
            result["seconds"] = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, default=str))
        tasks[task] = json.loads(path.read_text())
    data = {"machine": machine(), "args": vars(args), "tasks": tasks}
    write_results("goal_yardstick", data, markdown(data))


def markdown(data: dict) -> str:
    args = data["args"]
    lines = ["# The goal table's yardstick, one guidance level at a time", "",
             f"`benchmarks/goal_yardstick.py` on {data['machine']['date']}: the exact optimum "
             f"at each task's gamma/alpha, {args['optimum_samples']} base samples per digit "
             f"topped up to at most {args['optimum_max_samples']} until every target's ESS is "
             f"50, {args['steps']}-step DDPM sampler, the rewards under {args['out']}. Score: "
             "macro-F1, joint accuracy for the pair.", "",
             "| task | gamma/alpha | score | KL (nats) | ESS min | ESS mean | base samples "
             "per digit | seconds |", "|---|---|---|---|---|---|---|---|"]
    for task, result in data["tasks"].items():
        level = result["levels"][0]
        lines.append(f"| {task} | {level['gamma_over_alpha']:g} | {level['score']:.3f} | "
                     f"{level['kl']:.2f} | {level['ess_min']:.1f} | {level['ess_mean']:.0f} | "
                     f"{result['samples_drawn']} | {result.get('seconds', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
