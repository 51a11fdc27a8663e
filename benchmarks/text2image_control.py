"""The control on the latent text-to-image testbed, next to its exact optimum: ink, compressibility
and the two together, on the training prompts and on held-out paraphrases.

Each task is `configs/ctrl_text2image_ink.yaml` (the value rule, CFG 2 on the prompt, 20 steps,
batch 32, checkpoints every 20 updates) with its rewards and gamma/alpha (ink 1, compressibility
10 as in `configs/ctrl_digits_compress.yaml`, the pair 1), trained with 3 seeds. The setting
chosen is the number of updates (a checkpoint), on VALIDATION evaluation seeds and the training
prompts: the most macro-F1 (joint accuracy for the pair) among the checkpoints whose mean KL is
at most 1.5x the optimum's, else the one with the least KL. Reported on separate TEST
evaluation seeds, for the training prompts and for paraphrases of templates no training prompt
used, each next to the exact optimum at the same gamma/alpha (importance-resampled base samples
of the same prompts, effective sample size shown). Runs and optima already on disk are read back.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text2image_control.py [--tasks ink ...]
        [--seeds 0 1 2] [--final]

`--final` scores the config as it stands instead: each run's final policy at the full budget
(the default rule's final fit and its step scale chosen by the objective), nothing chosen on
evaluation seeds (results text2image_final.{json,md}).

Needs `outputs/base-text2image` (`ctrl-ray text2image build`), the 32x32 rewards
`outputs/reward-ink32` / `outputs/reward-compress32` (`ctrl-ray reward train` on
data/digits32.parquet) and the judge `outputs/judge-digits16`. Writes
benchmarks/results/text2image_control.{json,md} and docs/text2image_frontier_<task>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.evaluation import EvaluationConfig, evaluate  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup, finetune  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.optimum import OptimumConfig, exact_optimum  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402

CONFIG = "configs/ctrl_text2image_ink.yaml"
OUT = Path("outputs/bench-text2image")
INK, COMPRESS = "outputs/reward-ink32", "outputs/reward-compress32"
TASKS = {   # name -> (rewards, gamma / kl_weight)
    "ink": ([INK], 1.0),
    "compress": ([COMPRESS], 10.0),
    "joint": ([INK, COMPRESS], 1.0),
}
PROMPT_SETS = {
    "training": ["a handwritten zero", "the digit one", "a drawing of the number 2",
                 "three written by hand", "a handwritten four", "the digit five",
                 "a drawing of the number 6", "seven written by hand", "a handwritten eight",
                 "the digit nine"],
    "paraphrase": ["a picture of the numeral zero", "someone wrote a one on paper",
                   "a sketch of a 2", "an image showing the figure three",
                   "a picture of the numeral 4", "someone wrote a five on paper",
                   "a sketch of a six", "an image showing the figure 7",
                   "a picture of the numeral eight", "someone wrote a 9 on paper"],
}
VALIDATION_SEED, TEST_SEED = 10_000, 30_000
SAMPLES_PER_TARGET = 8
KL_BUDGET = 1.5          # x the optimum's KL
FRONTIER_TILTS = [0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 30.0]


@dataclass(frozen=True)
class Bench:
    """What a control benchmark runs: its fine-tuning config and tasks, the update rule (None:
    the config's own), where its runs and its optima are kept, and how its plots are named."""

    config: str = CONFIG
    out: Path = OUT
    optima: Path = OUT
    tasks: dict = field(default_factory=lambda: TASKS)
    rule: str | None = None
    plot_prefix: str = "text2image_frontier"
    title: str = "text-to-image testbed"
    step_scales: tuple = (None,)   # value-head step scales chosen among (None: the config's)
    overrides: tuple = ()          # config overrides before the task's (e.g. another rule's)
    final_policy: bool = False     # score each run's final policy: nothing chosen on seeds


TEXT2IMAGE = Bench()


def task_config(task: str, seed: int, bench: Bench = TEXT2IMAGE) -> FinetuneConfig:
    rewards, gamma = bench.tasks[task]
    rule = [f"mode={bench.rule}"] if bench.rule else []
    return load_config(FinetuneConfig, bench.config, [
        *bench.overrides,
        "rewards=[" + ", ".join(f"{{path: {path}}}" for path in rewards) + "]",
        f"objective.gamma={gamma}", f"seed={seed}", "evaluate=false",
        "optimum_samples_per_context=0", "experiment=ctrl-ray-bench",
        f"output_dir={bench.out}/{task}-seed{seed}", *rule])


def train(task: str, seed: int, bench: Bench = TEXT2IMAGE) -> tuple[Path, float]:
    """Fine-tune one seed (read back when its policy is on disk); its checkpoint directory."""
    config = task_config(task, seed, bench)
    out = Path(config.output_dir)
    seconds = float("nan")
    if not (out / "policy").is_dir():
        start = time.perf_counter()
        finetune(config, progress=False, resume="if-present")
        seconds = time.perf_counter() - start
    return out / "checkpoints", seconds


def score(report: dict, task: str) -> float:
    """Macro-F1 of the task's label, joint accuracy for the pair."""
    return report["joint_accuracy"] if task == "joint" else report["macro_f1"]


def evaluation(policy_dir: Path, prompts: str, seed: int, judge,
               step_scale: float | None = None) -> dict:
    """One prompt set on one evaluation seed (cached beside the policy); `step_scale` samples a
    value head with its step multiplied (the fit does not depend on it)."""
    suffix = "" if step_scale is None else f"-scale{step_scale}"
    cache = policy_dir / f"eval-{prompts}-{seed}{suffix}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    loaded = load_any(policy_dir)
    if step_scale is not None:
        loaded.model.value_head.spec.step_scale = step_scale
    config = EvaluationConfig(samples_per_target=SAMPLES_PER_TARGET,
                              contexts=PROMPT_SETS[prompts], context_digits=list(range(10)),
                              num_inference_steps=20, seed=seed)
    report = evaluate(loaded.model, loaded.label_info, judge, config)
    report = {key: value for key, value in report.items() if key != "grid"}
    cache.write_text(json.dumps(report))
    return report


def optimum(task: str, prompts: str, judge, samples: int, bench: Bench = TEXT2IMAGE) -> dict:
    """The exact optimum at the task's gamma/alpha and along FRONTIER_TILTS, for one prompt set."""
    cache = bench.optima / f"optimum-{task}-{prompts}-{samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    config = task_config(task, 0, bench)
    setup = build_setup(config)
    setup.model.eval()
    tilt = config.objective.tilt_exponent(math.prod(setup.model.sample_shape))
    levels = sorted({tilt, *FRONTIER_TILTS})
    result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                           OptimumConfig(samples_per_context=samples,
                                         contexts=PROMPT_SETS[prompts],
                                         context_digits=list(range(10)), guidance_levels=levels,
                                         num_inference_steps=20, eta=1.0))
    result["tilt"] = tilt
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, default=str))
    return result


def at_tilt(result: dict) -> dict:
    return next(level for level in result["levels"]
                if math.isclose(level["gamma_over_alpha"], result["tilt"]))


def choose_iteration(task: str, runs: dict[int, Path], judge, optimum_kl: float,
                     step_scales: tuple = (None,)) -> tuple:
    """The number of updates and the step scale, chosen on validation seeds (training prompts),
    and the table of every candidate: (updates, scale) -> (mean score, mean KL)."""
    candidates: dict[tuple, list[dict]] = {}
    for checkpoints in runs.values():
        for checkpoint in sorted(p for p in checkpoints.iterdir() if p.name.isdigit()):
            for scale in step_scales:
                report = evaluation(checkpoint, "training", VALIDATION_SEED, judge, scale)
                candidates.setdefault((int(checkpoint.name), scale), []).append(report)
    table = {key: (float(np.mean([score(r, task) for r in reports])),
                   float(np.mean([r["mean_kl"] for r in reports])))
             for key, reports in candidates.items()}
    within = [key for key, (_, kl) in table.items() if kl <= KL_BUDGET * optimum_kl]
    chosen = max(within, key=lambda key: table[key][0]) if within else \
        min(table, key=lambda key: table[key][1])
    return chosen, table


def candidate_name(key: tuple) -> str:
    """'updates' or 'updates x scale' for a validation table's key."""
    iteration, scale = key
    return str(iteration) if scale is None else f"{iteration} x{scale:g}"


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over seeds."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def run_task(task: str, seeds: list[int], judge, samples: int,
             bench: Bench = TEXT2IMAGE) -> dict:
    runs, seconds = {}, {}
    for seed in seeds:
        runs[seed], seconds[seed] = train(task, seed, bench)
    optima = {prompts: optimum(task, prompts, judge, samples, bench) for prompts in PROMPT_SETS}
    reference = at_tilt(optima["training"])
    if bench.final_policy:   # the run's own choices only (final fit, step scale by objective)
        policies, scale = {seed: runs[seed].parent / "policy" for seed in seeds}, None
        reports = [evaluation(policies[seed], "training", VALIDATION_SEED, judge)
                   for seed in seeds]
        chosen = "final"
        validation = {(chosen, None): (float(np.mean([score(r, task) for r in reports])),
                                       float(np.mean([r["mean_kl"] for r in reports])))}
    else:
        (chosen, scale), validation = choose_iteration(task, runs, judge, reference["kl"],
                                                       bench.step_scales)
        policies = {seed: runs[seed] / f"{chosen:06d}" for seed in seeds}
    result = {"chosen_iteration": chosen, "chosen_step_scale": scale, "train_seconds": seconds,
              "validation": {candidate_name(k): v for k, v in validation.items()}, "sets": {}}
    heads = [getattr(load_any(policies[seed]).model, "value_head", None) for seed in seeds] \
        if bench.final_policy else []
    if heads and all(heads):   # the scale each value run chose by the objective
        result["run_step_scales"] = [head.spec.step_scale for head in heads]
    for prompts, opt in optima.items():
        level, base = at_tilt(opt), opt["base"]
        reports = [evaluation(policies[seed], prompts, TEST_SEED, judge, scale)
                   for seed in seeds]
        scores = [score(r, task) for r in reports]
        kls = [r["mean_kl"] for r in reports]
        result["sets"][prompts] = {
            "score": interval(scores), "kl": interval(kls),
            "fidelity": interval([r.get("fidelity", float("nan")) for r in reports]),
            "per_seed": [{"score": s, "kl": k} for s, k in zip(scores, kls, strict=True)],
            "per_label": {name: interval([r["labels"][name]["macro_f1"] for r in reports])
                          for name in reports[0]["labels"]},
            "optimum": {"score": score(level, task), "kl": level["kl"],
                        "ess_min": level["ess_min"], "fidelity": level.get("fidelity")},
            "base": {"score": score(base, task), "fidelity": base.get("fidelity")},
            "score_ratio": float(np.mean(scores)) / score(level, task),
            "kl_ratio": float(np.mean(kls)) / level["kl"],
            "frontier": [{"tilt": lv["gamma_over_alpha"], "score": score(lv, task),
                          "kl": lv["kl"], "ess_min": lv["ess_min"]} for lv in opt["levels"]],
        }
    result["checkpoints"] = {}
    for seed in seeds:
        paths = sorted(p for p in runs[seed].iterdir() if p.name.isdigit())
        if bench.final_policy:
            paths.append(policies[seed])
        result["checkpoints"][str(seed)] = {
            path.name: (score(report, task), report["mean_kl"]) for path, report in (
                (path, evaluation(path, "training", VALIDATION_SEED, judge, scale))
                for path in paths)}
    plot_frontier(task, result, bench)
    return result


def plot_frontier(task: str, result: dict, bench: Bench = TEXT2IMAGE) -> Path:
    """Reward-KL frontier: the optimum along gamma/alpha, the runs' checkpoints, the chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for prompts, style in (("training", "-"), ("paraphrase", "--")):
        points = result["sets"][prompts]["frontier"]
        axis.plot([p["kl"] for p in points], [p["score"] for p in points], style, marker="o",
                  color="black", label=f"exact optimum ({prompts} prompts)")
    for seed, points in result["checkpoints"].items():
        kls, scores = zip(*[(kl, s) for s, kl in points.values()], strict=True)
        axis.plot(kls, scores, ":", marker=".", alpha=0.7,
                  label=f"{bench.rule or 'value'} rule, seed {seed}")
    for prompts, marker in (("training", "*"), ("paraphrase", "P")):
        chosen = result["sets"][prompts]
        axis.plot(chosen["kl"][0], chosen["score"][0], marker, markersize=12,
                  label=f"{'final policy' if bench.final_policy else 'chosen'}, test seeds "
                        f"({prompts})")
    axis.set_xlabel("mean path KL to the base (nats)")
    axis.set_ylabel("joint accuracy" if task == "joint" else "macro-F1")
    axis.set_title(f"{bench.title}: {task}")
    axis.legend(fontsize=7)
    path = Path("docs") / f"{bench.plot_prefix}_{task}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown(data: dict, plot_prefix: str = TEXT2IMAGE.plot_prefix) -> list[str]:
    if data.get("final"):
        how = (f"`benchmarks/text2image_control.py --final` on {data['machine']['date']}: "
               f"`{CONFIG}` as it stands (today's default value rule, its full budget), seeds "
               f"{data['seeds']}. Each run's final policy is scored (the head's final fit and "
               "its step scale, which the run chooses by CTRL's objective on its own "
               "rollouts): nothing is chosen on evaluation seeds. The table is on test "
               f"evaluation seed {TEST_SEED}, the validation line on seed {VALIDATION_SEED} ")
    else:
        how = (f"`benchmarks/text2image_control.py` on {data['machine']['date']}: "
               f"`{CONFIG}` (value rule, CFG 2, 20 steps, batch 32, checkpoints every 20 "
               f"updates), seeds {data['seeds']}. The number of updates is chosen on "
               f"validation evaluation seed {VALIDATION_SEED} with the training prompts (most "
               f"score within {KL_BUDGET}x the optimum's KL); the table is on test evaluation "
               f"seed {TEST_SEED} ")
    lines = ["# Control on the latent text-to-image testbed, next to the exact optimum", "",
             how + f"({SAMPLES_PER_TARGET} samples per (y, prompt), 10 prompts per set). "
             "Per nat: (score - the base's) / KL. "
             "Intervals: 95% t over the seeds. The optimum: " + ", ".join(
                 f"{task} {result['optimum_samples']}" for task, result in data["tasks"].items())
             + " base samples per prompt, importance-resampled; ESS min over (y, prompt).", "",
             "| task | prompts | updates | CTRL score | CTRL KL | fidelity | optimum score @ KL "
             "(ESS min) | score ratio | KL ratio | per nat (optimum's) | base |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, result in data["tasks"].items():
        for prompts, row in result["sets"].items():
            (s, sh), (k, kh), (f, _) = row["score"], row["kl"], row["fidelity"]
            opt, base = row["optimum"], row["base"]["score"]
            lines.append(
                f"| {task} | {prompts} | {result['chosen_iteration']} | {s:.3f} +- {sh:.3f} | "
                f"{k:.2f} +- {kh:.2f} | {f:.3f} | {opt['score']:.3f} @ {opt['kl']:.2f} "
                f"({opt['ess_min']:.0f}) | {row['score_ratio']:.2f}x | {row['kl_ratio']:.2f}x | "
                f"{(s - base) / k:.3f} ({(opt['score'] - base) / opt['kl']:.3f}) | {base:.3f} |")
    lines += validation_lines(data["tasks"])
    lines += [f"- {task}: step scales the runs chose (seeds {data['seeds']}): "
              f"{result['run_step_scales']}" for task, result in data["tasks"].items()
              if result.get("run_step_scales")]
    lines += ["", "Frontier plots: " + ", ".join(
        f"[{task}](../../docs/{plot_prefix}_{task}.png)" for task in data["tasks"])]
    return lines


def validation_lines(results: dict[str, dict]) -> list[str]:
    """Markdown: each run's validation table (updates -> score @ KL, mean over seeds)."""
    lines = ["", "Validation (training prompts, mean over seeds): updates -> score @ KL", ""]
    for name, result in results.items():
        cells = ", ".join(f"{i}: {s:.3f} @ {k:.2f}"
                          for i, (s, k) in sorted(result["validation"].items(),
                                                  key=lambda item: (item[0].split()[0].zfill(9),
                                                                    item[0])))
        lines.append(f"- {name}: {cells}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--optimum-samples", type=int, default=1000,
                        help="base samples per prompt for the optimum (ESS >= 50 needs ~1000 "
                             "on ink)")
    parser.add_argument("--final", action="store_true",
                        help="score each run's final policy at the config's full budget (the "
                             "default rule's own choices), not a checkpoint chosen on the "
                             "validation seed; runs under outputs/bench-text2image-final, "
                             "results text2image_final.{json,md}")
    args = parser.parse_args()
    tracking.configure()
    judge = DigitJudge.load("outputs/judge-digits16")
    name = "text2image_final" if args.final else "text2image_control"
    bench = Bench(out=Path("outputs/bench-text2image-final"), final_policy=True,
                  plot_prefix="text2image_final") if args.final else TEXT2IMAGE
    data = {"machine": machine(), "seeds": args.seeds, "final": args.final, "tasks": {}}
    results = Path(__file__).with_name("results") / f"{name}.json"
    for task in args.tasks:
        result = run_task(task, args.seeds, judge, args.optimum_samples, bench)
        if results.is_file():   # keep the tasks of other invocations (they may run in parallel)
            data["tasks"] = json.loads(results.read_text()).get("tasks", {})
        data["tasks"][task] = {**result, "optimum_samples": args.optimum_samples}
        publish(name, data, markdown(data, bench.plot_prefix))


if __name__ == "__main__":
    main()
