"""The goal table's yardstick for the frontier's tasks, at each task's own gamma/alpha only,
its base samples per digit topped up until every target's ESS is at least 50 (or a cap).
`frontier.py` estimates the optimum at four guidance levels from at most 1,000 base samples
per digit, which leaves the compress x ink pair at an ESS of 3 at gamma/alpha 1; a single
level can take many more samples where only it needs them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/goal_yardstick.py [--tasks multi] \
        [--max-samples 32000] [--out outputs/bench-frontier-fit3000] \
        [--proposal POLICY_DIR --short-pair-samples 3000]

Where a (digit, target) pair's ESS stays below 50 at the cap, `--proposal` re-estimates that
pair alone from a trained policy's samples drawn for it, weighted by p^lambda p_pre / q of
their paths (`ctrl_ray.optimum.add_proposal_for_short_pairs`); the other pairs keep their base
samples.

Uses the rewards the frontier trained under --out (the same pairs and seeds). Writes
benchmarks/results/goal_yardstick.{json,md}, each task with the arguments it was run with; a
task not run keeps its committed entry. Each task's estimate is cached under --out, and
`default_goal.py` takes it where its ESS is the higher. The samples drawn are kept under
--out/TASK/samples[-PROPOSAL_RUN], saved every 2,048: a run resumes there, a run with larger
caps (`--max-samples`, `--max-short-pair-samples`) draws only what they add, and `--pairs` in
a second process draws some pairs meanwhile. `--base-samples-from` starts a task's cache from
another's base samples, rescored by this --out's reward (a base sample does not depend on the
reward: N = 100 pairs' yardstick takes N = 1,000's samples).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, testbed_parser, write_results  # noqa: E402
from frontier import LABELS, TILT, _optimum, _optimum_setup  # noqa: E402

from ctrl_ray.optimum import (  # noqa: E402
    PoolCache,
    SamplePool,
    pair_pool,
    rescored,
    smallest_ess,
)
from ctrl_ray.policy import load_any  # noqa: E402


def main() -> None:
    parser = testbed_parser(__doc__, "base", "judge", base="outputs/base-digits16-demo")
    parser.add_argument("--tasks", nargs="+", default=["multi"], choices=list(LABELS))
    parser.add_argument("--optimum-samples", type=int, default=300)
    parser.add_argument("--max-samples", type=int, default=32000, dest="optimum_max_samples",
                        help="base samples per digit at most")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--proposal", default=None,
                        help="a trained policy of the task, for the pairs still short at the cap")
    parser.add_argument("--short-pair-samples", type=int, default=0,
                        help="the proposal's samples per pair still short (with --proposal)")
    parser.add_argument("--max-short-pair-samples", type=int, default=0,
                        help="top a pair still short up to this many of the proposal's samples")
    parser.add_argument("--pairs", nargs="+", default=None, metavar="CONTEXT:TARGET_INDEX",
                        help="only draw (and cache) the proposal's samples for these pairs, "
                             "with one --tasks: a second process can draw them meanwhile")
    parser.add_argument("--base-samples-from", default=None, metavar="SAMPLES_DIR",
                        help="start from another estimate's base samples (its cache directory: "
                             "the same base model, sampler and seed), rescored by this --out's "
                             "reward instead of drawn again")
    parser.add_argument("--num-pairs", type=int, default=1000,
                        help="the pairs per label the rewards under --out were trained on "
                             "(frontier.py's --num-pairs); the result's entry is the task's, "
                             "TASK-nN where N is not 1,000")
    parser.add_argument("--out", default="outputs/bench-frontier-fit3000")
    args = parser.parse_args()
    if bool(args.proposal) != bool(args.short_pair_samples):
        parser.error("--proposal and --short-pair-samples go together")
    if args.pairs and (not args.proposal or len(args.tasks) != 1):
        parser.error("--pairs takes --proposal and one --tasks")
    torch.set_num_threads(1)
    out = Path(args.out)
    missing = [str(out / f"reward-{label}") for task in args.tasks for label in LABELS[task]
               if not (out / f"reward-{label}").is_dir()]
    if missing:
        parser.error(f"no trained reward at {', '.join(missing)}: run frontier.py with this "
                     "--out first")
    if args.base_samples_from and not (Path(args.base_samples_from) / "base.npz").is_file():
        parser.error(f"no base samples at {Path(args.base_samples_from) / 'base.npz'}: "
                     "--base-samples-from takes another estimate's samples directory")
    if args.base_samples_from:
        for task in args.tasks:
            _rescore_base(task, args)
    if args.pairs:
        _draw_pairs(args.tasks[0], args)
        return
    estimates = {}
    for task in args.tasks:
        path = out / task / f"yardstick-{_name(args)}.json"
        if not path.is_file():
            rewards = [str(out / f"reward-{label}") for label in LABELS[task]]
            start = time.perf_counter()
            proposal = load_any(args.proposal).model.eval() if args.proposal else None
            result = _optimum(task, rewards, args, levels=[TILT[task]], proposal=proposal,
                              cache=_cache(task, args))
            result["seconds"] = time.perf_counter() - start
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, default=str))
        estimates[entry(task, args.num_pairs)] = {**json.loads(path.read_text()),
                                                  "args": vars(args), "date": machine()["date"]}
    # read at the end, not the start: another run may have written its entries meanwhile
    committed = RESULTS / "goal_yardstick.json"
    tasks = _committed_tasks(json.loads(committed.read_text())) if committed.is_file() else {}
    data = {"machine": machine(), "tasks": {**tasks, **estimates}}
    write_results("goal_yardstick", data, markdown(data))


def entry(task: str, num_pairs: int) -> str:
    """A yardstick's entry in goal_yardstick.json: the task's name, with its N where the
    rewards were trained on other than the frontier's 1,000 pairs."""
    return task if num_pairs == 1000 else f"{task}-n{num_pairs}"


def _name(args) -> str:
    """The estimate's name: its caps and proposal samples."""
    short = (f"-short{args.short_pair_samples}"
             f"{f'-to{args.max_short_pair_samples}' if args.max_short_pair_samples else ''}"
             if args.proposal else "")
    return f"max{args.optimum_max_samples}{short}"


def _cache(task: str, args) -> PoolCache:
    """Where a task's samples are kept (the base's and each short pair's), so that a run
    resumes, a run with larger caps only draws what they add, and `--pairs` in another process
    can draw some pairs meanwhile. One directory per proposal (named after its run's): the
    pairs' samples are its."""
    proposal = f"-{Path(args.proposal).resolve().parent.name}" if args.proposal else ""
    return PoolCache(Path(args.out) / task / f"samples{proposal}")


def _rescore_base(task: str, args) -> None:
    """Save `args.base_samples_from`'s base samples, scored by this task's reward, as the
    task's cached base samples (where it has none yet); the top-up then draws what the ESS
    under this reward still asks for."""
    rewards = [str(Path(args.out) / f"reward-{label}") for label in LABELS[task]]
    config, setup, _ = _optimum_setup(task, rewards, args, [TILT[task]])
    source = Path(args.base_samples_from) / "base.npz"
    start = time.perf_counter()
    pool = _cache(task, args).get("base", lambda saved, keep: saved if saved is not None
                                  else rescored(SamplePool.load(source), setup.model,
                                                setup.image_log_likelihood, config.optimum))
    print(f"{task}: {len(pool.context_of_row)} base samples from {source}, "
          f"{time.perf_counter() - start:.0f} s", flush=True)


def _draw_pairs(task: str, args) -> None:
    """Draw the proposal's samples for `args.pairs` into the task's cache, for a main run
    (the same arguments without --pairs) to join with its base samples."""
    rewards = [str(Path(args.out) / f"reward-{label}") for label in LABELS[task]]
    config, setup, judge = _optimum_setup(task, rewards, args, [TILT[task]])
    proposal = load_any(args.proposal).model.eval()
    for pair in args.pairs:
        context, index = (int(part) for part in pair.split(":"))
        start = time.perf_counter()
        pool = _cache(task, args).get(f"pair-{context}-{index}",
                                      lambda saved, keep, c=context, i=index: pair_pool(
                                          proposal, setup.label_info,
                                          setup.image_log_likelihood, judge, config.optimum,
                                          c, i, start=saved, keep=keep))
        rows = np.arange(len(pool.context_of_row))
        ess = smallest_ess(pool, list(pool.log_likelihood)[index], rows, [TILT[task]])
        print(f"{task} pair {pair}: {len(rows)} samples, ESS {ess:.1f}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def _committed_tasks(data: dict) -> dict:
    """The committed tasks, each with its own arguments (older files kept them once, at the
    top)."""
    return {task: {"args": data.get("args"), "date": data["machine"]["date"], **result}
            for task, result in data["tasks"].items()}


def markdown(data: dict) -> str:
    lines = ["# The goal table's yardstick, one guidance level at a time", "",
             "`benchmarks/goal_yardstick.py`: the exact optimum at each task's gamma/alpha, "
             "base samples per digit topped up (to at most the cap) until every target's ESS "
             "is 50, and where a run names a proposal, a trained policy's samples for each "
             "(digit, target) pair still short at the cap; 20-step DDPM sampler. Score: "
             "macro-F1, joint accuracy for the pair.", "",
             "| task | gamma/alpha | from | score | KL (nats) | ESS min | ESS mean | base "
             "samples per digit (cap) | rewards under | seconds | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, result in data["tasks"].items():
        args = result["args"]
        estimates = [("base samples", result.get("base_samples_levels", [None])[0])] \
            if result.get("short_pairs") else []
        shorts = result.get("short_pairs", [])
        pairs = ", ".join(f"{pair['context']} / {pair['target']}"
                          + (f" ({pair['samples']}, ESS {pair['ess_min']:.0f})"
                             if "samples" in pair else "") for pair in shorts)
        each = (f" ({args['short_pair_samples']} each)" if shorts and "samples" not in shorts[0]
                else "")
        source = f"base; the policy for {pairs}{each}" if pairs else "base samples"
        for name, level in [*estimates, (source, result["levels"][0])]:
            lines.append(
                f"| {task} | {level['gamma_over_alpha']:g} | {name} | {level['score']:.3f} | "
                f"{level['kl']:.2f} | {level['ess_min']:.1f} | {level['ess_mean']:.0f} | "
                f"{result['samples_drawn']} ({args['optimum_max_samples']}) | {args['out']} | "
                f"{result.get('seconds', float('nan')):.0f} | {result['date']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
