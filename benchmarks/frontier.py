"""The reward-KL frontier: control quality against KL to the base model, next to the optimum.

For each task (ink, compressibility, the compress x ink pair) this trains the reward(s) on N
pairs, estimates the exact optimum p_pre p(y | x)^(gamma / alpha) at several guidance levels
(`ctrl_ray.optimum`: importance-weighted base samples), fine-tunes with CTRL at the task's
gamma / alpha, runs DPS, classifier guidance and CFG from the same N pairs at several guidance
scales (a frontier per method), and scores everything with the same evaluation protocol (oracle
labels, digit judge, path KL) on one evaluation seed. Each frontier is also read at each CTRL
row's KL (linear in KL between its two nearest points).

Rule `default` is what a user gets: the task's config (configs/ctrl_digits_ink.yaml, its
compressibility twin, the ink config with both rewards for the pair) with no `mode:`, at its
full budget; the rule is chosen once per task (`ctrl_ray.rule_choice`) and run for every seed.
The other rules are fixed settings of earlier frontiers.

    .venv/bin/python benchmarks/frontier.py [--tasks ink compress multi] [--rules default] \
        [--seeds 0 1 2] [--baselines dps cg cfg] [--baseline-seeds 0 1 2] \
        [--set adjoint:iterations=300]

Writes benchmarks/results/frontier.{json,md}, docs/frontier.png, and logs all of it to MLflow
(experiment ctrl-ray-frontier). Each run's result is cached under --out, so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, testbed_parser, write_results  # noqa: E402
from plots import frontier_plot  # noqa: E402
from text2image_control import TEST_SEED, interval  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.audit import AuditConfig  # noqa: E402
from ctrl_ray.baselines.run import load_baseline_config, run_baseline  # noqa: E402
from ctrl_ray.config import load_config, load_raw, to_dict  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup, finetune  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.optimum import exact_optimum  # noqa: E402
from ctrl_ray.reward_training import RewardJobConfig, train_reward_job  # noqa: E402
from ctrl_ray.rule_choice import choose_rule, with_rule  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"ink": ["ink_class"], "compress": ["compress_class"],
          "multi": ["compress_class", "ink_class"]}
TILT = {"ink": 1.0, "compress": 10.0, "multi": 1.0}   # each task's gamma / alpha
GUIDANCE_LEVELS = [0.3, 1.0, 3.0, 10.0]   # every CTRL run is at 1 or 10
TASK_CONFIGS = {"ink": "configs/ctrl_digits_ink.yaml",
                "compress": "configs/ctrl_digits_compress.yaml",
                "multi": "configs/ctrl_digits_ink.yaml"}

# Every rule at the same sampler (20 DDPM steps); budgets sized for a 2-core CPU.
VALUE = ["mode=value", "adapter.kind=value", "adapter.min_timestep=0", "objective.batch_size=32",
         "iterations=100", "objective.lr_adapter=0.003"]
RULES = {
    "default": ["mode=auto"],   # the task's config with the rule left to ctrl-ray
    "value": [*VALUE, "objective.regression_steps=30", "objective.replay_rollouts=4096"],
    # frontier_value_replay.md's rows: 60 head steps per update over-fit the head (more KL).
    "value-steps60": [*VALUE, "objective.regression_steps=60", "objective.replay_rollouts=4096"],
    # The first frontier's value rows (each update regresses on its own 32 rollouts only).
    "value-noreplay": [*VALUE, "objective.regression_steps=60", "objective.replay_rollouts=0"],
    "adjoint": ["mode=adjoint", "objective.batch_size=32", "iterations=120",
                "objective.lr_embedding=0.03", "objective.lr_adapter=0.003",
                "adapter.min_timestep=200"],
    "pathwise": ["mode=pathwise", "objective.batch_size=16", "iterations=100",
                 "objective.truncation.mode=none", "objective.lr_embedding=0.01",
                 "objective.lr_adapter=0.0005"],
    "ppo": ["mode=ppo", "objective.batch_size=32", "iterations=100", "objective.ppo_epochs=2",
            "objective.minibatch_size=160", "objective.lr_embedding=0.01",
            "objective.lr_adapter=0.001"],
}
# The first scale of each trains what the others reuse (CFG's network, CG's classifiers).
BASELINE_SCALES = {"dps": [1.0, 0.1, 0.3, 3.0], "cg": [3.0, 0.3, 1.0, 10.0],
                   "cfg": [1.0, 0.5, 3.0]}


def main() -> None:
    parser = testbed_parser(__doc__, "base", "judge", "dataset")
    parser.add_argument("--num-pairs", type=int, default=1000)
    parser.add_argument("--tasks", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--baselines", nargs="*", default=["dps", "cg", "cfg"],
                        choices=["dps", "cg", "cfg"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples-per-target", type=int, default=8)
    parser.add_argument("--optimum-samples", type=int, default=300)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds of the CTRL runs")
    parser.add_argument("--baseline-seeds", nargs="+", type=int, default=[0],
                        help="training seeds of CG's classifiers and CFG's network (DPS trains "
                             "nothing: one run per scale)")
    parser.add_argument("--optimum-max-samples", type=int, default=0,
                        help="top a context whose optimum has ESS < 50 up to this many samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="RULE:key=value for one rule (e.g. adjoint:iterations=300)")
    parser.add_argument("--out", default="outputs/bench-frontier")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "frontier.png"))
    parser.add_argument("--name", default="frontier",
                        help="results file name under benchmarks/results (NAME.json, NAME.md)")
    parser.add_argument("--scales", nargs="*", type=float,
                        help="guidance scales of the baselines (default: each one's list)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    start = time.perf_counter()
    tracking.use_experiment("ctrl-ray-frontier")
    tasks = {}
    for task in args.tasks:
        rewards = [_reward(label, args, out) for label in LABELS[task]]
        tasks[task] = {"tilt": TILT[task], "rewards": rewards, "runs": []}
        for rule in args.rules:
            for seed in args.seeds:
                tasks[task]["runs"].append(_cached(
                    out / task / f"ctrl-{rule}-seed{seed}.json",
                    lambda t=task, r=rewards, m=rule, s=seed: _ctrl_run(t, r, m, s, args, out)))
        for kind in args.baselines:
            for seed in [0] if kind == "dps" else args.baseline_seeds:
                for scale in args.scales or BASELINE_SCALES[kind]:
                    tasks[task]["runs"].append(_cached(
                        out / task / f"{_baseline_name(kind, scale, seed)}.json",
                        lambda t=task, r=rewards, k=kind, s=scale, d=seed: _baseline_run(
                            t, r, k, s, d, args, out)))
        # Runs an earlier invocation cached for this task (other rules, scales) count too.
        done = {(run["method"], run.get("seed")) for run in tasks[task]["runs"]}
        for path in sorted((out / task).glob("*.json")):
            run = json.loads(path.read_text())
            if "method" in run and (run["method"], run.get("seed")) not in done:
                tasks[task]["runs"].append(run)
        tasks[task]["methods"] = _methods(tasks[task]["runs"])
        # After the runs, so that invocations sharing --out on other cores share it.
        tasks[task]["optimum"] = _cached(out / task / "optimum.json",
                                         lambda t=task, r=rewards: _optimum(t, r, args))
    data = {"machine": machine(), "seconds": time.perf_counter() - start, "args": vars(args),
            "rules": RULES, "tasks": tasks}
    frontier_plot(tasks, args.plot)
    markdown = _markdown(data)
    write_results(args.name, data, markdown)
    with mlflow.start_run(run_name="frontier"):
        mlflow.log_artifact(args.plot)
        mlflow.log_text(markdown, "frontier.md")
        for task, result in tasks.items():
            for row in result["methods"]:
                mlflow.log_metric(f"{task}_{row['method']}_score", row["score"])
                mlflow.log_metric(f"{task}_{row['method']}_kl", row["kl"])
    print(markdown)


def _cached(path: Path, compute):
    """The JSON at ``path``, else compute it and write it there (a benchmark resumes)."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str))
    return value


def _reward(label: str, args, out: Path) -> str:
    path = out / f"reward-{label}"
    if not path.exists():
        config = load_config(RewardJobConfig, "configs/reward_compress.yaml", [
            f"dataset={args.dataset}", f"label={label}", f"num_pairs={args.num_pairs}",
            f"pairs={out}/pairs-{label}-{args.num_pairs}.parquet", f"output_dir={path}"])
        result = train_reward_job(config, progress=False)
        print(f"reward {label}: test accuracy {result['test_accuracy']:.3f}")
    return str(path)


def _score(report: dict, task: str) -> float:
    """The task's headline number: macro-F1 (single label) or joint accuracy (two labels)."""
    return report["joint_accuracy"] if len(LABELS[task]) > 1 else report["macro_f1"]


def _optimum(task: str, rewards: list[str], args, levels: list[float] | None = None,
             proposal=None, cache=None) -> dict:
    """The exact optimum of `task` at `levels` (default: GUIDANCE_LEVELS and the task's tilt),
    each level's score the task's headline number; with a `proposal` policy, its samples for
    the pairs whose base ESS stays short (``args.short_pair_samples`` each, topped up to
    ``args.max_short_pair_samples``); with a `cache` (`PoolCache`), samples kept there."""
    config, setup, judge = _optimum_setup(task, rewards, args, levels)
    result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                           config.optimum, proposal=proposal, cache=cache)
    for level in [result["base"], *result["levels"], *result.get("base_samples_levels", [])]:
        level["score"] = _score(level, task)
    return result


def _optimum_setup(task: str, rewards: list[str], args, levels: list[float] | None = None):
    """The audit config of `task`'s optimum, its setup (base model, rewards) and the judge."""
    config = load_config(AuditConfig, overrides=[
        f"base_model={args.base}", f"judge={args.judge}",
        "rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]"])
    setup = build_setup(FinetuneConfig(base_model=config.base_model, rewards=config.rewards,
                                       judge=config.judge))
    setup.model.eval()
    config.optimum.samples_per_context = args.optimum_samples
    config.optimum.max_samples_per_context = args.optimum_max_samples
    config.optimum.num_inference_steps = args.steps
    config.optimum.guidance_levels = levels or sorted({*GUIDANCE_LEVELS, TILT[task]})
    config.optimum.short_pair_samples = getattr(args, "short_pair_samples", 0)
    config.optimum.max_short_pair_samples = getattr(args, "max_short_pair_samples", 0)
    return config, setup, DigitJudge.load(args.judge)


def _ctrl_run(task: str, rewards: list[str], rule: str, seed: int, args, out: Path) -> dict:
    extra = [o.split(":", 1)[1] for o in args.overrides if o.startswith(f"{rule}:")]
    overrides = [
        f"base_model={args.base}", f"judge={args.judge}",
        "rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]",
        *RULES[rule], f"objective.gamma={TILT[task]}", "objective.kl_weight=1.0",
        f"objective.num_inference_steps={args.steps}", f"seed={seed}",
        f"evaluation.num_inference_steps={args.steps}", f"evaluation.seed={TEST_SEED}",
        f"evaluation.samples_per_target={args.samples_per_target}",
        "evaluate_base=false", "optimum_samples_per_context=0", "checkpoint_every=0",
        f"output_dir={out / task / f'ctrl-{rule}-seed{seed}'}", "experiment=ctrl-ray-frontier",
        *extra]
    choice = None
    if rule == "default":
        raw = load_raw(TASK_CONFIGS[task], overrides)
        choice = _cached(out / task / "rule-choice.json", lambda: choose_rule(raw)[1])
        config = with_rule(raw, choice["mode"])[0]
    else:
        config = load_config(FinetuneConfig, overrides=overrides)
    start = time.perf_counter()
    result = finetune(config, progress=False, rule_choice=choice)
    report = result["ctrl"]
    return {"method": f"ctrl-{rule}", "kind": "ctrl", "rule": config.mode, "seed": seed,
            "rule_choice": choice, "config": to_dict(config),
            "seconds": time.perf_counter() - start, "score": _score(report, task),
            "kl": report["mean_kl"], "fidelity": report.get("fidelity"), "report": report}


def _baseline_name(kind: str, scale: float, seed: int) -> str:
    """A baseline run's folder name; seed 0 keeps the name of the runs before seeds."""
    return f"{kind}-{scale:g}" + (f"-seed{seed}" if seed else "")


def _baseline_run(task: str, rewards: list[str], kind: str, scale: float, seed: int, args,
                  out: Path) -> dict:
    """A guided baseline at one guidance scale and training seed; the trained CFG network or
    CG classifiers of the task's first scale (same seed) are reused by the others."""
    overrides = [f"base_model={args.base}", f"judge={args.judge}", f"guidance_scale={scale}",
                 f"evaluation.num_inference_steps={args.steps}",
                 f"evaluation.samples_per_target={args.samples_per_target}",
                 f"evaluation.seed={TEST_SEED}", "evaluate_base=false",
                 f"output_dir={out / task / _baseline_name(kind, scale, seed)}",
                 "experiment=ctrl-ray-frontier"]
    if kind == "dps":
        overrides.append("rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]")
    else:
        overrides += [f"training.seed={seed}", f"dataset={args.dataset}", "pairs=[" + ", ".join(
            f"{{label: {label}, num_pairs: {args.num_pairs}, seed: {i}, "
            f"path: {out}/pairs-{label}-{args.num_pairs}.parquet}}"
            for i, label in enumerate(LABELS[task])) + "]"]
        first = out / task / _baseline_name(kind, BASELINE_SCALES[kind][0], seed)
        if kind == "cfg" and (first / "cfg_model").exists():
            overrides.append(f"model={first / 'cfg_model'}")
        if kind == "cg" and (first / "classifiers").exists():
            overrides.append("classifiers=[" + ", ".join(
                str(p) for p in sorted((first / "classifiers").iterdir())) + "]")
    config = load_baseline_config(kind, f"configs/baseline_{kind}.yaml", overrides)
    start = time.perf_counter()
    result = run_baseline(kind, config, progress=False)
    report = result[kind]
    return {"method": f"{kind}-{scale:g}", "kind": kind, "guidance_scale": scale, "seed": seed,
            "seconds": time.perf_counter() - start, "score": _score(report, task),
            "kl": report["mean_kl"], "fidelity": report.get("fidelity"), "report": report}


def _methods(runs: list[dict]) -> list[dict]:
    """One row per method: the mean over its seeds with 95% t-intervals."""
    rows = []
    for method in dict.fromkeys(run["method"] for run in runs):
        group = [run for run in runs if run["method"] == method]
        score, score_half = interval([run["score"] for run in group])
        kl, kl_half = interval([run["kl"] for run in group])
        rows.append({"method": method, "kind": group[0]["kind"], "seeds": len(group),
                     "rule": group[0].get("rule"), "score": score, "score_half": score_half,
                     "kl": kl, "kl_half": kl_half,
                     "guidance_scale": group[0].get("guidance_scale"),
                     "fidelity": float(np.mean([run["fidelity"] if run["fidelity"] is not None
                                                else np.nan for run in group])),
                     "seconds": float(np.mean([run["seconds"] for run in group]))})
    return rows


def at_kl(points: list[tuple[float, float]], kl: float) -> float | None:
    """The score of a frontier (KL, score points) at `kl`, linear between its two nearest points
    in KL; None outside the KL it spans."""
    points = sorted(points)
    for (kl_low, low), (kl_high, high) in zip(points, points[1:], strict=False):
        if kl_low <= kl <= kl_high:
            return low + (high - low) * (kl - kl_low) / max(kl_high - kl_low, 1e-12)
    return None


def _per_nat(gain: float, kl: float) -> str:
    return f"{gain / kl:.3f}" if kl >= 0.01 else "-"


def _pm(mean: float, half: float) -> str:
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} +- {half:.3f}"


def _baseline_seeds(data: dict) -> list[tuple[str, list[int]]]:
    """The training seeds each trained baseline (CG, CFG) has runs for; runs cached before
    seeds were recorded are seed 0."""
    runs = [run for task in data["tasks"].values() for run in task["runs"]]
    return [(kind, sorted({run.get("seed") or 0 for run in runs if run.get("kind") == kind}))
            for kind in ("cg", "cfg") if any(run.get("kind") == kind for run in runs)]


def _markdown(data: dict) -> str:
    minutes = sum(run.get("seconds", 0) for task in data["tasks"].values()
                  for run in task["runs"]) / 60
    lines = ["# The reward-KL frontier on the digits testbed", "",
             f"Generated by `benchmarks/frontier.py` on {data['machine']['date']} "
             f"({data['machine']['platform']}, torch {data['machine']['torch']}, "
             f"{data['machine']['cpu_count']} thread); the runs took "
             f"{minutes:.0f} min. Base model {data['args']['base']}. "
             f"N = {data['args']['num_pairs']} pairs per label, {data['args']['steps']}-step "
             f"DDPM sampler for every method, {data['args']['samples_per_target']} samples per "
             f"(y, c) target on evaluation seed {TEST_SEED}, oracle labels, digit judge for "
             f"fidelity. Score: macro-F1 (single label) or joint accuracy (two labels). KL: mean "
             f"path KL to the base model (nats); for the exact optimum, the importance weights' KL "
             f"({data['args']['optimum_samples']} base samples per digit"
             + (f", topped up to {data['args']['optimum_max_samples']} where its ESS is below 50"
                if data['args']['optimum_max_samples'] else "") + "). Per nat: score "
             f"gained over the base per nat of KL. Mean +- 95% t-interval over training seeds "
             f"(the seeds column): {data['args']['seeds']} for CTRL"
             + "".join(f", {seeds} for {kind.upper()}" for kind, seeds in _baseline_seeds(data))
             + " (DPS trains nothing).", ""]
    for task, result in data["tasks"].items():
        optimum = result["optimum"]
        base = optimum["base"]["score"]
        at_run = next(level for level in optimum["levels"]
                      if level["gamma_over_alpha"] == result["tilt"])
        lines += [f"## {task} (runs at gamma/alpha = {result['tilt']:g})", ""]
        choice = next((run["rule_choice"] for run in result["runs"] if run.get("rule_choice")),
                      None)
        if choice:
            lines += [f"The default's rule, chosen before training: {choice['reason']}.", ""]
        lines += ["| method | seeds | score | x optimum | KL (nats) | x optimum's KL | per nat | "
                  "fidelity | seconds |", "|---|---|---|---|---|---|---|---|---|",
                  f"| base model | | {base:.3f} | {base / at_run['score']:.2f} | 0 | | | "
                  f"{optimum['base'].get('fidelity', float('nan')):.3f} | |"]
        for level in optimum["levels"]:
            lines.append(f"| exact optimum, gamma/alpha {level['gamma_over_alpha']:g} "
                         f"(ESS min {level['ess_min']:.0f}) | | {level['score']:.3f} | "
                         f"{level['score'] / at_run['score']:.2f} | {level['kl']:.2f} | "
                         f"{level['kl'] / at_run['kl']:.2f} | "
                         f"{_per_nat(level['score'] - base, level['kl'])} | "
                         f"{level.get('fidelity', float('nan')):.3f} | |")
        for row in result["methods"]:
            lines.append(f"| {row['method']} | {row['seeds']} | "
                         f"{_pm(row['score'], row['score_half'])} | "
                         f"{row['score'] / at_run['score']:.2f} | "
                         f"{_pm(row['kl'], row['kl_half'])} | {row['kl'] / at_run['kl']:.2f} | "
                         f"{_per_nat(row['score'] - base, row['kl'])} | "
                         f"{row['fidelity']:.3f} | {row['seconds']:.0f} |")
        lines.append("")
        for ctrl in (row for row in result["methods"] if row["kind"] == "ctrl"):
            lines += [f"At {ctrl['method']}'s KL ({ctrl['kl']:.2f} nats), each frontier read "
                      "linearly between its two nearest points in KL:", "",
                      "| method | score at that KL | its KL range (nats) |", "|---|---|---|"]
            frontiers = {"exact optimum": [(0.0, base)] + [
                (level["kl"], level["score"]) for level in optimum["levels"]]}
            for row in result["methods"]:
                if row["kind"] != "ctrl":
                    frontiers.setdefault(row["kind"], [(0.0, base)]).append(
                        (row["kl"], row["score"]))
            for name, points in frontiers.items():
                score = at_kl(points, ctrl["kl"])
                kls = [kl for kl, _ in points]
                lines.append(f"| {name} | {'-' if score is None else f'{score:.3f}'} | "
                             f"{min(kls):.2f}-{max(kls):.2f} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
