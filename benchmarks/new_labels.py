"""The default update rule on two labels of the 16x16 digits that no config was tuned on, tried as
a new user would, next to the exact optimum at the same gamma/alpha, with the KL per step.

The labels (`benchmarks/new_labels_labellers.py`): `centre_x`, where the ink's centre of mass
sits left to right, and `slant`, which way the strokes lean, 3 classes each (tertiles of the real
digits). Per label, the whole path a user takes, through the CLI:

1. 600 real digits (data/digits16.parquet, train split) exported as PNGs with one labels CSV per
   label, computed by the exact labeller from the PNGs themselves (data/new_labels/);
2. `ctrl-ray data import` (20% held out, stratified) and `ctrl-ray reward train`
   (configs/reward_own_pairs.yaml, the labeller as the scorer, no judge);
3. `ctrl-ray finetune` with the demo's base model and the demo's CTRL settings, but with no
   `mode:` line (the default rule), gamma = kl_weight = 1, 3 seeds, in one process. The
   rule choice (`ctrl_ray.rule_choice`) gives both labels the value rule (gamma/alpha 1: the
   value targets' mass is 1; `benchmarks/rule_choice.py` has Adjoint Matching beside it).

Then, in this process: the exact optimum at gamma/alpha 1 (base samples per digit topped up until
the ESS of every target is at least 50), the number of updates chosen on VALIDATION evaluation
seeds (the most macro-F1 within 1.5x the optimum's KL, else the least KL) and reported on TEST
evaluation seeds with 95% t-intervals over the seeds (the protocol and helpers of
`benchmarks/text2image_control.py`), the policy's KL at every sampler step, and (with
`--first-step-kl`) the optimum's KL by the end of step 1 by nested rollouts, as
`benchmarks/value_probes/first_step_kl.py` does on the text testbed. Everything on disk
(outputs/new-labels/) is read back.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/new_labels.py [--labels centre_x slant]
        [--seeds 0 1 2] [--first-step-kl] [--variant NAME --set KEY=VALUE ...]

`--variant NAME --set KEY=VALUE ...` runs the same protocol with the demo's settings changed
(runs under outputs/new-labels/ctrl-LABEL-NAME-seedS, results in new_labels_NAME.{json,md}).

Needs outputs/base-digits16-demo (`ctrl-ray demo` or `ctrl-ray pretrain --config
configs/demo.yaml`'s pretrain section) and the digit judge outputs/judge-digits16. Writes
benchmarks/results/new_labels.{json,md}.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import choose_within_kl, machine, publish, testbed_parser  # noqa: E402
from new_labels_labellers import CENTRE_X_CLASSES, SLANT_CLASSES  # noqa: E402
from text2image_control import KL_BUDGET, TEST_SEED, VALIDATION_SEED, interval  # noqa: E402

from ctrl_ray import tracking  # noqa: E402
from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.data.digits import ensure_digits  # noqa: E402
from ctrl_ray.evaluation import EvaluationConfig, evaluate  # noqa: E402
from ctrl_ray.finetune import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.models.judge import DigitJudge  # noqa: E402
from ctrl_ray.optimum import OptimumConfig, exact_optimum  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample, step_mean  # noqa: E402
from ctrl_ray.scoring import label_images_for  # noqa: E402

LABELLERS = "benchmarks/new_labels_labellers.py"
LABELS = {"centre_x": CENTRE_X_CLASSES, "slant": SLANT_CLASSES}
DATA, OUT = Path("data/new_labels"), Path("outputs/new-labels")
DEMO_BASE, JUDGE = "outputs/base-digits16-demo", "outputs/judge-digits16"
BASE = str(OUT / "base-digits16-demo")   # a copy: a demo run elsewhere may rewrite the original
NUM_IMAGES = 600
STEPS = 20
SAMPLES_PER_TARGET = 4                             # per (y, digit): the demo's evaluation
OPTIMUM_SAMPLES, OPTIMUM_MAX_SAMPLES = 300, 4000   # per digit (the runs compute none)
# the yardstick's base samples per digit, topped up where the ESS of a target is below 50
YARDSTICK_MAX_SAMPLES = 32000
PER_STEP_SAMPLES = 2                               # per (y, c) target, for the KL per step
NESTED_STATES, NESTED_CONTINUATIONS, NESTED_DIGITS = 64, 16, (1, 4, 7)
# The demo's CTRL settings (configs/demo.yaml, finetune) with no `mode:` line: the default rule.
CTRL_SETTINGS = {
    "base_model": BASE,
    "adapter": {"min_timestep": 0},
    "objective": {"gamma": 1.0, "kl_weight": 1.0, "batch_size": 32,
                  "num_inference_steps": STEPS, "lr_adapter": 0.003, "regression_steps": 30},
    "iterations": 60,
    "checkpoint_every": 20,
    "judge": JUDGE,
    "evaluation": {"samples_per_target": SAMPLES_PER_TARGET, "num_inference_steps": STEPS},
    "optimum_samples_per_context": OPTIMUM_SAMPLES,
    "optimum_max_samples_per_context": OPTIMUM_MAX_SAMPLES,
    "distributed": {"workers": 0},
    "experiment": "ctrl-ray-bench",
}


def ensure_base() -> None:
    """Copy the demo's base model (once), so that every run and evaluation reads the same one."""
    if not Path(BASE, "ctrl_ray.json").is_file():
        shutil.copytree(DEMO_BASE, BASE)


def cli(*args: str) -> None:
    """Run one `ctrl-ray` command as a user would, printing what it prints."""
    command = [str(Path(sys.executable).with_name("ctrl-ray")), *args]
    print("$ ctrl-ray " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def export_images() -> list[str]:
    """600 real digits (train split, drawn with seed 0) as PNGs; their file names."""
    folder = DATA / "images"
    dataset = ensure_digits("data/digits16.parquet", size=16).subset("train")
    rows = np.random.default_rng(0).choice(len(dataset.images), NUM_IMAGES, replace=False)
    names = [f"digit{dataset.digits[row]}_{row:04d}.png" for row in rows]
    if not all((folder / name).is_file() for name in names):
        folder.mkdir(parents=True, exist_ok=True)
        for name, row in zip(names, rows, strict=True):
            pixels = np.round((dataset.images[row, 0] + 1.0) * 127.5).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / name)
    return names


def write_labels(label: str, names: list[str]) -> Path:
    """labels CSV of one label: the exact labeller applied to the PNGs as saved."""
    path = DATA / f"{label}.csv"
    if not path.is_file():
        pixels = np.stack([np.asarray(Image.open(DATA / "images" / name), np.float32)
                           for name in names])[:, None] / 127.5 - 1.0
        classes = label_images_for(pixels, label, {
            "num_classes": 3, "class_names": list(LABELS[label]),
            "scorer": {"kind": "labeller", "function": f"{LABELLERS}:{label}"}})
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file_name", "label"])
            writer.writerows((name, LABELS[label][c]) for name, c in zip(names, classes,
                                                                           strict=True))
    return path


def prepare(label: str, names: list[str]) -> dict:
    """Import the pairs and train the reward (each once); the reward's held-out report."""
    labels_csv = write_labels(label, names)
    pairs = DATA / f"{label}.parquet"
    if not pairs.is_file():
        cli("data", "import", "--images", str(DATA / "images"), "--labels", str(labels_csv),
            "--name", label, "--classes", ",".join(LABELS[label]), "--size", "16",
            "--channels", "1", "--out", str(pairs))
    reward = OUT / f"reward-{label}"
    if not (reward / "model.safetensors").is_file():
        cli("reward", "train", "--config", "configs/reward_own_pairs.yaml",
            "--set", f"pairs={pairs}", "--set", f"label={label}",
            "--set", f"labeller={LABELLERS}:{label}", "--set", "judge.enabled=false",
            "--set", f"output_dir={reward}", "--set", "experiment=ctrl-ray-bench")
    saved = json.loads((reward / "config.json").read_text())
    meta = saved["meta"]
    return {"heldout": meta["heldout"], "labeller_agreement": meta["labeller_agreement"],
            "temperature": saved["temperature"], "num_pairs_train": meta["num_pairs_train"]}


def ctrl_config(label: str) -> Path:
    """The run's YAML: the demo's settings, this label's reward, and no `mode:` line."""
    path = OUT / f"ctrl_{label}.yaml"
    settings = {**CTRL_SETTINGS, "rewards": [{"path": str(OUT / f"reward-{label}")}],
                "output_dir": str(OUT / f"ctrl-{label}")}
    assert "mode" not in settings
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


VARIANT: dict = {"name": "", "overrides": []}   # `--variant NAME --set KEY=VALUE ...`
# what the exact optimum depends on: a variant may change how the optimum is reached, not it
OPTIMUM_KEYS = ("base_model", "rewards", "objective.gamma", "objective.kl_weight",
                "objective.kl_reduction", "objective.num_inference_steps", "objective.eta",
                "objective.label_distribution", "objective.context_distribution")


def run_dir(label: str, seed: int) -> Path:
    """One seed's run: the demo's settings, or a named variant's."""
    name = f"-{VARIANT['name']}" if VARIANT["name"] else ""
    return OUT / f"ctrl-{label}{name}-seed{seed}"


def train(label: str, seed: int, resume: bool = True) -> Path:
    """`ctrl-ray finetune` for one seed (skipped when its policy is on disk, or when not
    `resume`: then the checkpoints written so far are used); its checkpoints."""
    out = run_dir(label, seed)
    if resume and not (out / "policy").is_dir():
        overrides = [arg for item in VARIANT["overrides"] for arg in ("--set", item)]
        cli("finetune", "--config", str(ctrl_config(label)), "--set", f"seed={seed}",
            "--set", f"output_dir={out}", "--set", "evaluate=false",
            "--set", "optimum_samples_per_context=0", *overrides, "--resume-if-present")
    return out / "checkpoints"


def cached(path: Path, compute) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, default=str))
    return result


def evaluation(policy_dir: Path, seed: int, judge) -> dict:
    """Macro-F1 (by the labeller), fidelity and path KL on evaluation seed `seed`."""
    def compute() -> dict:
        loaded = load_any(policy_dir)
        config = EvaluationConfig(samples_per_target=SAMPLES_PER_TARGET,
                                  num_inference_steps=STEPS, seed=seed)
        report = evaluate(loaded.model, loaded.label_info, judge, config)
        return {key: value for key, value in report.items() if key != "grid"}
    return cached(policy_dir / f"eval-{seed}.json", compute)


def optimum(label: str, judge) -> dict:
    """The exact optimum at gamma/alpha 1 and the base, ESS >= 50 for every target."""
    def compute() -> dict:
        config = load_config(FinetuneConfig, str(ctrl_config(label)), [])
        setup = build_setup(config)
        setup.model.eval()
        tilt = config.objective.tilt_exponent(math.prod(setup.model.sample_shape))
        result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                               OptimumConfig(samples_per_context=OPTIMUM_SAMPLES,
                                             max_samples_per_context=YARDSTICK_MAX_SAMPLES,
                                             guidance_levels=[tilt],
                                             num_inference_steps=STEPS, eta=1.0))
        return {**result, "tilt": tilt}
    return cached(OUT / f"optimum-{label}-max{YARDSTICK_MAX_SAMPLES}.json", compute)


def per_step_kl(policy_dir: Path) -> list[float]:
    """The policy's KL at each sampler step (first step first), mean over PER_STEP_SAMPLES
    samples of every (y, c) on the test seeds."""
    def compute() -> dict:
        policy = load_any(policy_dir).model.eval()
        (name, classes), = policy.label_classes.items()
        targets = [(y, c) for y in range(classes) for c in range(policy.num_contexts)
                   for _ in range(PER_STEP_SAMPLES)]
        inputs = RolloutInputs.draw(TEST_SEED, len(targets), STEPS, policy.sample_shape,
                                    policy.label_classes, num_contexts=policy.num_contexts)
        inputs.labels = {name: torch.tensor([y for y, _ in targets])}
        inputs.contexts = torch.tensor([c for _, c in targets])
        with torch.no_grad():
            kl = sample(policy, inputs, eta=1.0, compute_kl=True).kl
        return {"kl": kl.mean(1).tolist()}
    return cached(policy_dir / "per-step-kl.json", compute)["kl"]


def first_step_optimum_kl(label: str) -> dict:
    """The optimum's KL to the base by the end of step 1 (the initial tilt included), by nested
    rollouts: NESTED_STATES base states after step 1, NESTED_CONTINUATIONS base continuations
    of each score h_1(x) = mean p(y | x0); KL = E*[log h_1 / Z], per (digit, y) and averaged."""
    def compute() -> dict:
        setup = build_setup(load_config(FinetuneConfig, str(ctrl_config(label)), []))
        model = setup.model.eval()
        schedule = DenoisingSchedule.create(model.alphas_cumprod, STEPS, 1.0)
        generator = torch.Generator().manual_seed(0)
        (name, classes), = model.label_classes.items()
        table = {}
        for digit in NESTED_DIGITS:
            x = torch.randn((NESTED_STATES, *model.sample_shape), generator=generator)
            contexts = torch.full((NESTED_STATES,), digit)
            with torch.no_grad():
                x = step_mean(schedule, 0, model.reference_noise, x, contexts,
                              model.clip_sample) + \
                    schedule.sigmas[0] * torch.randn(x.shape, generator=generator)
                x = x.repeat_interleave(NESTED_CONTINUATIONS, 0)
                contexts = torch.full((len(x),), digit)
                for step in range(1, STEPS):
                    mean = step_mean(schedule, step, model.reference_noise, x, contexts,
                                     model.clip_sample)
                    x = mean + schedule.sigmas[step] * torch.randn(x.shape, generator=generator)
                images = model.decode(x)
            for y in range(classes):
                with torch.no_grad():
                    log_p = setup.image_log_likelihood(
                        images, {name: torch.full((len(x),), y)}, contexts).double()
                log_h = torch.logsumexp(log_p.view(NESTED_STATES, NESTED_CONTINUATIONS), 1) - \
                    math.log(NESTED_CONTINUATIONS)
                log_z = torch.logsumexp(log_h, 0) - math.log(NESTED_STATES)
                weights = torch.softmax(log_h, 0)
                table[f"{digit},{y}"] = float((weights * (log_h - log_z)).sum())
        return {"per_target": table, "mean": float(np.mean(list(table.values())))}
    return cached(OUT / f"first-step-optimum-kl-{label}.json", compute)


def checkpoints(runs: dict[int, Path]) -> list[int]:
    """The numbers of updates every run has a checkpoint of."""
    present = [{int(p.name) for p in run.iterdir() if p.name.isdigit()} for run in runs.values()]
    return sorted(set.intersection(*present))


def choose_iteration(runs: dict[int, Path], judge, optimum_kl: float) -> tuple[int, dict]:
    """The number of updates, chosen on the validation seeds, and the validation table."""
    reports = {iteration: [evaluation(run / f"{iteration:06d}", VALIDATION_SEED, judge)
                           for run in runs.values()] for iteration in checkpoints(runs)}
    table = {iteration: (float(np.mean([r["macro_f1"] for r in group])),
                         float(np.mean([r["mean_kl"] for r in group])))
             for iteration, group in reports.items()}
    return choose_within_kl(table, optimum_kl, KL_BUDGET), table


def evaluate_checkpoints(label: str, seeds: list[int], judge) -> None:
    """Evaluate every checkpoint on disk of these runs on the validation and test seeds, with
    its KL per step (to spread the evaluations over processes; `run_label` reads them back)."""
    for seed in seeds:
        run = run_dir(label, seed) / "checkpoints"
        for iteration in checkpoints({seed: run}):
            for evaluation_seed in (VALIDATION_SEED, TEST_SEED):
                evaluation(run / f"{iteration:06d}", evaluation_seed, judge)
            per_step_kl(run / f"{iteration:06d}")


def run_label(label: str, names: list[str], seeds: list[int], judge, nested: bool,
              resume: bool) -> dict:
    reward = prepare(label, names)
    runs = {seed: train(label, seed, resume) for seed in seeds}
    opt = optimum(label, judge)
    level, base = next(lv for lv in opt["levels"]
                       if math.isclose(lv["gamma_over_alpha"], opt["tilt"])), opt["base"]
    chosen, validation = choose_iteration(runs, judge, level["kl"])
    reports = [evaluation(runs[seed] / f"{chosen:06d}", TEST_SEED, judge) for seed in seeds]
    scores, kls = [r["macro_f1"] for r in reports], [r["mean_kl"] for r in reports]
    steps = np.asarray([per_step_kl(runs[seed] / f"{chosen:06d}") for seed in seeds])
    base_score = base["macro_f1"]
    ctrl_score, ctrl_kl = float(np.mean(scores)), float(np.mean(kls))
    result = {
        "reward": reward, "chosen_iteration": chosen,
        "runs_complete": all((run.parent / "policy").is_dir() for run in runs.values()),
        "validation": {str(k): v for k, v in validation.items()},
        "score": interval(scores), "kl": interval(kls),
        "fidelity": interval([r.get("fidelity", float("nan")) for r in reports]),
        "per_seed": [{"seed": s, "score": f, "kl": k}
                     for s, f, k in zip(seeds, scores, kls, strict=True)],
        "scorer": reports[0]["labels"][label]["scorer"],
        "base": {"score": base_score, "fidelity": base.get("fidelity")},
        "optimum": {"score": level["macro_f1"], "kl": level["kl"], "ess_min": level["ess_min"],
                    "fidelity": level.get("fidelity"),
                    "base_samples_per_digit": opt["samples_drawn"]},
        "score_ratio": ctrl_score / level["macro_f1"], "kl_ratio": ctrl_kl / level["kl"],
        "per_nat": {"ctrl": (ctrl_score - base_score) / ctrl_kl,
                    "optimum": (level["macro_f1"] - base_score) / level["kl"]},
        "per_step_kl": {"mean": steps.mean(0).tolist(), "per_seed": steps.tolist(),
                        "total": float(steps.sum(1).mean())},
    }
    if result["runs_complete"]:
        # What `ctrl-ray finetune` saves and a user samples: the last update, then the value
        # rule's final fit and the step scale chosen by J (a checkpoint has neither).
        saved = [evaluation(run.parent / "policy", TEST_SEED, judge) for run in runs.values()]
        scores, kls = [r["macro_f1"] for r in saved], [r["mean_kl"] for r in saved]
        result["saved_policy"] = {
            "score": interval(scores), "kl": interval(kls),
            "score_ratio": float(np.mean(scores)) / level["macro_f1"],
            "kl_ratio": float(np.mean(kls)) / level["kl"],
            "per_nat": (float(np.mean(scores)) - base_score) / float(np.mean(kls)),
            "step_scales": [(json.loads((run.parent / "policy" / "policy.json").read_text())
                             .get("value_head") or {}).get("step_scale")
                            for run in runs.values()],
            "per_seed": [{"seed": s, "score": f, "kl": k}
                         for s, f, k in zip(seeds, scores, kls, strict=True)]}
    if nested:
        result["optimum_first_step_kl"] = first_step_optimum_kl(label)
    return result


def markdown(data: dict) -> list[str]:
    lines = ["# The default rule on two labels no config was tuned on, next to the exact optimum",
             "", f"`benchmarks/new_labels.py` on {data['machine']['date']}: two labels of "
             f"the 16x16 digits of our own (`{LABELLERS}`), {NUM_IMAGES} real digits exported "
             "as PNGs + labels.csv, `ctrl-ray data import`, `ctrl-ray reward train` "
             "(configs/reward_own_pairs.yaml, the labeller as scorer), `ctrl-ray finetune` with "
             f"the demo's base model ({BASE}) and the demo's settings with no `mode:` line (the "
             f"default rule), gamma = kl_weight = 1, batch 32, {STEPS} steps, "
             f"{CTRL_SETTINGS['iterations']} updates, checkpoints every "
             f"{CTRL_SETTINGS['checkpoint_every']}, seeds {data['seeds']}, one process. Updates "
             f"chosen on validation evaluation seed {VALIDATION_SEED} (most macro-F1 within "
             f"{KL_BUDGET}x the optimum's KL, else the least KL), reported on test seed "
             f"{TEST_SEED}, {SAMPLES_PER_TARGET} samples per (y, digit), scored by the labeller. "
             + (f"Variant `{data['variant']['name']}`: "
                + ", ".join(f"`{item}`" for item in data["variant"]["overrides"]) + ". "
                if data.get("variant", {}).get("name") else "")
             + "Intervals: 95% t over the seeds. Optimum: importance-resampled base samples, "
             f"{OPTIMUM_SAMPLES} per digit topped up to at most {YARDSTICK_MAX_SAMPLES} where the "
             "ESS of a target is below 50; ESS min over (y, digit). Per nat: (macro-F1 - base) "
             "/ KL. The KL per step of the value rule's tilted step is that of the Gaussian "
             "given its mean, an upper bound (docs/update_rules.md section 8).", "",
             "| label | reward held-out acc. | base | updates | CTRL macro-F1 | CTRL KL | "
             "optimum F1 @ KL (ESS min) | score ratio | KL ratio | per nat CTRL | per nat "
             "optimum |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in data["labels"].items():
        (s, sh), (k, kh), opt = r["score"], r["kl"], r["optimum"]
        accuracy = (r["reward"]["heldout"] or {}).get("accuracy", float("nan"))
        lines.append(
            f"| {label} | {accuracy:.3f} | {r['base']['score']:.3f} | {r['chosen_iteration']} "
            f"| {s:.3f} +- {sh:.3f} | {k:.2f} +- {kh:.2f} | {opt['score']:.3f} @ "
            f"{opt['kl']:.2f} ({opt['ess_min']:.0f}) | {r['score_ratio']:.2f}x | "
            f"{r['kl_ratio']:.2f}x | {r['per_nat']['ctrl']:.3f} | {r['per_nat']['optimum']:.3f} |")
    saved = {label: r["saved_policy"] for label, r in data["labels"].items()
             if "saved_policy" in r}
    if saved:
        lines += ["", "The policy each run saved (the last update, then the value rule's final "
                  "fit and the step scale chosen by J; a checkpoint above has neither), test "
                  "seed:", "", "| label | macro-F1 | KL | score ratio | KL ratio | per nat | "
                  "step scales |", "|---|---|---|---|---|---|---|"]
        for label, r in saved.items():
            (s, sh), (k, kh) = r["score"], r["kl"]
            lines.append(f"| {label} | {s:.3f} +- {sh:.3f} | {k:.2f} +- {kh:.2f} | "
                         f"{r['score_ratio']:.2f}x | {r['kl_ratio']:.2f}x | {r['per_nat']:.3f} | "
                         f"{r['step_scales']} |")
    lines.append("")
    for label, r in data["labels"].items():
        lines.append(
            f"- {label}: reward trained on {r['reward']['num_pairs_train']} pairs, held-out "
            f"accuracy {r['reward']['heldout']['accuracy']:.3f} on "
            f"{r['reward']['heldout']['num_rows']} rows; CTRL fidelity {r['fidelity'][0]:.3f}, "
            f"optimum's {r['optimum']['fidelity']:.3f}; optimum base samples per digit "
            f"{r['optimum']['base_samples_per_digit']}; per seed (macro-F1 @ KL) " + ", ".join(
                f"{p['score']:.3f} @ {p['kl']:.2f}" for p in r["per_seed"]) +
            ("" if r["runs_complete"] else "; **runs stopped before their last update**: the "
             "updates chosen among the checkpoints every seed had"))
    lines += ["", f"The policy's KL at each of the {STEPS} sampler steps (nats, first step "
              f"first; test seed, {PER_STEP_SAMPLES} samples per (y, digit), mean over seeds), "
              "and its total:", "",
              "| label | " + " | ".join(str(i + 1) for i in range(STEPS)) + " | total |",
              "|---|" + "---|" * (STEPS + 1)]
    for label, r in data["labels"].items():
        row = r["per_step_kl"]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in row["mean"]) +
                     f" | {row['total']:.2f} |")
    nested = {label: r["optimum_first_step_kl"] for label, r in data["labels"].items()
              if "optimum_first_step_kl" in r}
    if nested:
        lines += ["", f"The optimum's KL by the end of step 1 (nested rollouts: "
                  f"{NESTED_STATES} states x {NESTED_CONTINUATIONS} continuations, digits "
                  f"{list(NESTED_DIGITS)}, every y) next to the policy's first-step KL:", ""]
        for label, value in nested.items():
            lines.append(f"- {label}: optimum {value['mean']:.3f} nats, policy "
                         f"{data['labels'][label]['per_step_kl']['mean'][0]:.3f}")
    updates = sorted({int(i) for r in data["labels"].values() for i in r["validation"]})
    lines += ["", "Validation (mean over seeds), macro-F1 @ KL after each number of updates:",
              "", "| label | " + " | ".join(map(str, updates)) + " |",
              "|---|" + "---|" * len(updates)]
    for label, r in data["labels"].items():
        cells = [r["validation"].get(str(i)) for i in updates]
        lines.append(f"| {label} | " + " | ".join(
            "" if cell is None else f"{cell[0]:.3f} @ {cell[1]:.2f}" for cell in cells) + " |")
    return lines


def main() -> None:
    parser = testbed_parser(__doc__)
    parser.add_argument("--labels", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--first-step-kl", action="store_true",
                        help="also the optimum's KL by the end of step 1 (nested rollouts)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="export, import and train the rewards, then stop")
    parser.add_argument("--no-train", action="store_true",
                        help="start or resume no run: use the checkpoints every seed has")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the runs' checkpoints on disk (validation, test, KL per "
                             "step), then stop")
    parser.add_argument("--variant", default="",
                        help="name runs and results after a variant of the demo's settings")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help="the variant's settings (with --variant)")
    args = parser.parse_args()
    if args.overrides and not args.variant:
        parser.error("--set needs --variant (a variant's runs and results are kept apart)")
    moved = [item for item in args.overrides if item.split("=")[0] in OPTIMUM_KEYS]
    if moved:
        parser.error(f"--set {', '.join(moved)}: the variant would move the optimum it is "
                     f"compared with (cached per label for the demo's settings)")
    VARIANT.update(name=args.variant, overrides=args.overrides)
    torch.set_num_threads(1)
    tracking.configure()
    ensure_base()
    names = export_images()
    if args.prepare_only:
        for label in args.labels:
            print(label, prepare(label, names))
        return
    judge = DigitJudge.load(JUDGE)
    if args.evaluate_only:
        for label in args.labels:
            evaluate_checkpoints(label, args.seeds, judge)
        return
    name = "new_labels" + (f"_{args.variant}" if args.variant else "")
    results = Path(__file__).with_name("results") / f"{name}.json"
    data = {"machine": machine(), "seeds": args.seeds, "labels": {},
            "variant": {"name": args.variant, "overrides": args.overrides}}
    for label in args.labels:
        result = run_label(label, names, args.seeds, judge, args.first_step_kl,
                           resume=not args.no_train)
        if results.is_file():   # keep the labels of other invocations (they may run in parallel)
            data["labels"] = json.loads(results.read_text()).get("labels", {})
        data["labels"][label] = result
        publish(name, data, markdown(data))


if __name__ == "__main__":
    main()
