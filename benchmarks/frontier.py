"""The reward-KL frontier: control quality against KL to the base model, next to the optimum.

For each task (ink, compressibility, the compress x ink pair) this trains the reward(s) on N
pairs, estimates the exact optimum p_pre p(y | x)^(gamma / alpha) at several guidance levels
(`ctrl_ray.optimum`: importance-weighted base samples), fine-tunes with every CTRL update rule
at the task's gamma / alpha, runs DPS, classifier guidance and CFG from the same N pairs, and
scores everything with the same evaluation protocol (oracle labels, digit judge, path KL).

    .venv/bin/python benchmarks/frontier.py [--tasks ink compress multi] \
        [--rules value adjoint pathwise ppo] [--baselines dps cg cfg] [--set adjoint:iterations=300]

Writes benchmarks/results/frontier.{json,md}, docs/frontier.png, and logs all of it to MLflow
(experiment ctrl-ray-frontier). Each run's result is cached under --out, so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, testbed_parser, write_results  # noqa: E402
from plots import frontier_plot  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.audit import AuditConfig  # noqa: E402
from ctrl_ray.baselines.run import load_baseline_config, run_baseline  # noqa: E402
from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup, finetune  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.optimum import exact_optimum  # noqa: E402
from ctrl_ray.reward_training import RewardJobConfig, train_reward_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"ink": ["ink_class"], "compress": ["compress_class"],
          "multi": ["compress_class", "ink_class"]}
TILT = {"ink": 1.0, "compress": 10.0, "multi": 1.0}   # each task's gamma / alpha
GUIDANCE_LEVELS = [0.3, 1.0, 3.0, 10.0, 30.0, 100.0]

# Every rule at the same sampler (20 DDPM steps); budgets sized for a 2-core CPU.
VALUE = ["mode=value", "adapter.kind=value", "adapter.min_timestep=0", "objective.batch_size=32",
         "iterations=100", "objective.lr_adapter=0.003"]
RULES = {
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
BASELINE_SCALES = {"dps": [3.0, 10.0, 30.0, 1.0], "cg": [3.0, 10.0, 30.0], "cfg": [1.0, 3.0]}


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
    parser.add_argument("--seed", type=int, default=0)
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
        tasks[task] = {"tilt": TILT[task], "rewards": rewards,
                       "optimum": _cached(out / task / "optimum.json",
                                          lambda t=task, r=rewards: _optimum(t, r, args)),
                       "runs": []}
        for rule in args.rules:
            tasks[task]["runs"].append(_cached(
                out / task / f"ctrl-{rule}.json",
                lambda t=task, r=rewards, m=rule: _ctrl_run(t, r, m, args, out)))
        for kind in args.baselines:
            for scale in args.scales or BASELINE_SCALES[kind]:
                tasks[task]["runs"].append(_cached(
                    out / task / f"{kind}-{scale:g}.json",
                    lambda t=task, r=rewards, k=kind, s=scale: _baseline_run(t, r, k, s, args,
                                                                             out)))
        # Runs an earlier invocation cached for this task (other rules, scales) count too.
        done = {run["method"] for run in tasks[task]["runs"]}
        for path in sorted((out / task).glob("*.json")):
            run = json.loads(path.read_text())
            if path.name != "optimum.json" and run["method"] not in done:
                tasks[task]["runs"].append(run)
    data = {"machine": machine(), "seconds": time.perf_counter() - start, "args": vars(args),
            "rules": RULES, "tasks": tasks}
    frontier_plot(tasks, args.plot)
    markdown = _markdown(data)
    write_results(args.name, data, markdown)
    with mlflow.start_run(run_name="frontier"):
        mlflow.log_artifact(args.plot)
        mlflow.log_text(markdown, "frontier.md")
        for task, result in tasks.items():
            for run in result["runs"]:
                mlflow.log_metric(f"{task}_{run['method']}_score", run["score"])
                mlflow.log_metric(f"{task}_{run['method']}_kl", run["kl"])
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


def _optimum(task: str, rewards: list[str], args) -> dict:
    config = load_config(AuditConfig, overrides=[
        f"base_model={args.base}", f"judge={args.judge}",
        "rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]"])
    setup = build_setup(FinetuneConfig(base_model=config.base_model, rewards=config.rewards,
                                       judge=config.judge))
    setup.model.eval()
    config.optimum.samples_per_context = args.optimum_samples
    config.optimum.num_inference_steps = args.steps
    config.optimum.guidance_levels = sorted({*GUIDANCE_LEVELS, TILT[task]})
    result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood,
                           DigitJudge.load(args.judge), config.optimum)
    for level in [result["base"], *result["levels"]]:
        level["score"] = _score(level, task)
    return result


def _ctrl_run(task: str, rewards: list[str], rule: str, args, out: Path) -> dict:
    extra = [o.split(":", 1)[1] for o in args.overrides if o.startswith(f"{rule}:")]
    config = load_config(FinetuneConfig, overrides=[
        f"base_model={args.base}", f"judge={args.judge}",
        "rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]",
        *RULES[rule], f"objective.gamma={TILT[task]}", "objective.kl_weight=1.0",
        f"objective.num_inference_steps={args.steps}", f"seed={args.seed}",
        f"evaluation.num_inference_steps={args.steps}",
        f"evaluation.samples_per_target={args.samples_per_target}",
        "evaluate_base=false", "optimum_samples_per_context=0", "checkpoint_every=0",
        f"output_dir={out / task / f'ctrl-{rule}'}", "experiment=ctrl-ray-frontier", *extra])
    start = time.perf_counter()
    result = finetune(config, progress=False)
    report = result["ctrl"]
    return {"method": f"ctrl-{rule}", "kind": "ctrl", "rule": rule, "config": to_dict(config),
            "seconds": time.perf_counter() - start, "score": _score(report, task),
            "kl": report["mean_kl"], "fidelity": report.get("fidelity"), "report": report}


def _baseline_run(task: str, rewards: list[str], kind: str, scale: float, args,
                  out: Path) -> dict:
    """A guided baseline at one guidance scale; the trained CFG network or CG classifiers of
    the task's first scale are reused by the others."""
    overrides = [f"base_model={args.base}", f"judge={args.judge}", f"guidance_scale={scale}",
                 f"evaluation.num_inference_steps={args.steps}",
                 f"evaluation.samples_per_target={args.samples_per_target}",
                 "evaluate_base=false", f"output_dir={out / task / f'{kind}-{scale:g}'}",
                 "experiment=ctrl-ray-frontier"]
    if kind == "dps":
        overrides.append("rewards=[" + ", ".join(f"{{path: {r}}}" for r in rewards) + "]")
    else:
        overrides += [f"dataset={args.dataset}", "pairs=[" + ", ".join(
            f"{{label: {label}, num_pairs: {args.num_pairs}, seed: {i}, "
            f"path: {out}/pairs-{label}-{args.num_pairs}.parquet}}"
            for i, label in enumerate(LABELS[task])) + "]"]
        first = out / task / f"{kind}-{BASELINE_SCALES[kind][0]:g}"
        if kind == "cfg" and (first / "cfg_model").exists():
            overrides.append(f"model={first / 'cfg_model'}")
        if kind == "cg" and (first / "classifiers").exists():
            overrides.append("classifiers=[" + ", ".join(
                str(p) for p in sorted((first / "classifiers").iterdir())) + "]")
    config = load_baseline_config(kind, f"configs/baseline_{kind}.yaml", overrides)
    start = time.perf_counter()
    result = run_baseline(kind, config, progress=False)
    report = result[kind]
    return {"method": f"{kind}-{scale:g}", "kind": kind, "guidance_scale": scale,
            "seconds": time.perf_counter() - start, "score": _score(report, task),
            "kl": report["mean_kl"], "fidelity": report.get("fidelity"), "report": report}


def _markdown(data: dict) -> str:
    minutes = sum(run.get("seconds", 0) for task in data["tasks"].values()
                  for run in task["runs"]) / 60
    lines = ["# The reward-KL frontier on the digits testbed", "",
             f"Generated by `benchmarks/frontier.py` on {data['machine']['date']} "
             f"({data['machine']['platform']}, torch {data['machine']['torch']}, "
             f"{data['machine']['cpu_count']} thread); the runs took "
             f"{minutes:.0f} min. "
             f"N = {data['args']['num_pairs']} pairs per label, {data['args']['steps']}-step "
             f"DDPM sampler for every method, {data['args']['samples_per_target']} samples per "
             f"(y, c) target, oracle labels, digit judge for fidelity. Score: macro-F1 (single "
             f"label) or joint accuracy (two labels). KL: mean path KL to the base model "
             f"(nats); for the exact optimum, the importance weights' KL "
             f"({data['args']['optimum_samples']} base samples per digit).", ""]
    for task, result in data["tasks"].items():
        optimum = result["optimum"]
        at_run = next(level for level in optimum["levels"]
                      if level["gamma_over_alpha"] == result["tilt"])
        lines += [f"## {task} (runs at gamma/alpha = {result['tilt']:g})", "",
                  "| method | score | x optimum | KL (nats) | fidelity | seconds |",
                  "|---|---|---|---|---|---|",
                  f"| base model | {optimum['base']['score']:.3f} | "
                  f"{optimum['base']['score'] / at_run['score']:.2f} | 0 | "
                  f"{optimum['base'].get('fidelity', float('nan')):.3f} | |"]
        for level in optimum["levels"]:
            lines.append(f"| exact optimum, gamma/alpha {level['gamma_over_alpha']:g} | "
                         f"{level['score']:.3f} | {level['score'] / at_run['score']:.2f} | "
                         f"{level['kl']:.2f} | {level.get('fidelity', float('nan')):.3f} | |")
        for run in result["runs"]:
            fidelity = run["fidelity"] if run["fidelity"] is not None else float("nan")
            lines.append(f"| {run['method']} | {run['score']:.3f} | "
                         f"{run['score'] / at_run['score']:.2f} | {run['kl']:.2f} | "
                         f"{fidelity:.3f} | {run['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
