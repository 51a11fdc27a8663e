"""Training throughput of the four update rules (value, the default; adjoint; pathwise; ppo) on
the digits demo's config: the single-process loop against Ray with 1 and 2 rollout workers,
one thread per process, each setting repeated; achieved FLOP/s next to a fp32 matmul peak
measured in the same run; where a value update's time goes (digits and, with --text-base,
the text testbed); and the default rule's trajectories per second next to its control
(macro-F1 against the exact optimum, same seeds).

Writes benchmarks/results/throughput.{json,md} (`--results-name` for a partial run).

    nice -n 5 .venv/bin/python benchmarks/throughput.py            # the full run
    nice -n 5 .venv/bin/python benchmarks/throughput.py --rules value --repeats 3 \
        --iterations 20 --other-rules-iterations 5 --other-rules-repeats 1   # a reduced one
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import mlflow
import ray
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, publish  # noqa: E402

from ctrl_ray.config import from_dict, read_yaml  # noqa: E402
from ctrl_ray.distributed.driver import train  # noqa: E402
from ctrl_ray.distributed.ray_runtime import connect  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives import value as value_rule  # noqa: E402
from ctrl_ray.objectives.base import draw_inputs  # noqa: E402
from ctrl_ray.sampling.sampler import sample  # noqa: E402

RULES = ("value", "adjoint", "pathwise", "ppo")
SETTINGS = {0: "single process", 1: "Ray, 1 worker", 2: "Ray, 2 workers"}
SHARED_OBJECTIVE_KEYS = ("gamma", "kl_weight", "kl_reduction", "batch_size",
                         "num_inference_steps", "eta")
MATMUL_SIZE = 2048
REPLAY = 1920   # the rollouts a 60-update run of batch 32 (the demo's) has in its replay


class GlobalFlopCounter(FlopCounterMode):
    """`FlopCounterMode` that counts the total only: its per-module tracker hooks backward in a
    way `torch.autograd.grad` (the value head's step) does not support."""

    class _NoModules:
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = self._NoModules()


def matmul_peak(repeats: int = 7) -> dict:
    """GFLOP/s of a large fp32 matmul on this process's threads: the best and the median."""
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - start)
    flops = 2 * MATMUL_SIZE**3
    return {"best_gflops": flops / min(seconds) / 1e9,
            "median_gflops": flops / statistics.median(seconds) / 1e9,
            "threads": torch.get_num_threads()}


def demo_config(args, rule: str, workers: int, iterations: int, out: str,
                evaluate: bool = False) -> FinetuneConfig:
    """The demo's finetune section (configs/demo.yaml) on its base model, for `rule`: the value
    rule as the demo runs it, the others with the demo's objective (gamma, KL weight, batch,
    chain) and their own defaults; one thread per process."""
    raw = copy.deepcopy(read_yaml(args.config)["finetune"])
    if rule != "value":
        raw["objective"] = {k: raw["objective"][k] for k in SHARED_OBJECTIVE_KEYS
                            if k in raw["objective"]}
        raw["adapter"] = {"min_timestep": raw.get("adapter", {}).get("min_timestep", 0)}
    raw.update(base_model=args.base, mode=rule, iterations=iterations, evaluate=evaluate,
               evaluate_base=False, checkpoint_every=0, output_dir=out,
               experiment="ctrl-ray-throughput",
               distributed={"workers": workers, "cpus_per_worker": 1, "learner_cpus": 1})
    if evaluate:
        raw["evaluation"] = {**raw.get("evaluation", {}),
                             "samples_per_target": args.eval_samples_per_target}
        raw["optimum_samples_per_context"] = args.optimum_samples_per_context
        raw["optimum_max_samples_per_context"] = 0
    return from_dict(FinetuneConfig, raw)


def iteration_seconds(run_id: str) -> list[float]:
    """Seconds of every update after the first (the warm-up: actor start-up, first calls)."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "iteration_seconds")
    return [m.value for m in sorted(history, key=lambda m: m.step)][1:]


def run_setting(args, rule: str, workers: int, iterations: int, repeat: int) -> dict:
    """One timed run: `iterations` updates after a warm-up update."""
    config = demo_config(args, rule, workers, iterations + 1,
                         f"{args.out}/{rule}-{workers}-{repeat}")
    result = train(config, progress=False, overwrite=True)
    seconds = iteration_seconds(result["mlflow_run_id"])
    mean = statistics.mean(seconds)
    return {"rule": rule, "workers": workers, "repeat": repeat, "iterations": len(seconds),
            "seconds_per_update": mean,
            "trajectories_per_second": config.objective.batch_size / mean}


def count_update_flops(args, rule: str, iterations: int) -> float:
    """FLOPs per update after the warm-up, counted in one untimed single-process run of
    `iterations` updates (the split across workers changes no arithmetic)."""
    config = demo_config(args, rule, 0, iterations + 1, f"{args.out}/{rule}-flops")
    totals = []
    with GlobalFlopCounter() as counter:
        train(config, progress=False, overwrite=True,
              on_iteration=lambda done, roles: totals.append(counter.get_total_flops()))
    return (totals[-1] - totals[0]) / iterations


def control_of_default_rule(args) -> dict:
    """The value rule as the demo runs it, `--control-iterations` updates in one process, then
    evaluated: the ink label's macro-F1 (the evaluation's scorer) against the exact optimum's
    on the same evaluation seeds, and its trajectories per second."""
    config = demo_config(args, "value", 0, args.control_iterations, f"{args.out}/control",
                         evaluate=True)
    result = train(config, progress=False, overwrite=True)
    seconds = iteration_seconds(result["mlflow_run_id"])
    return {"iterations": args.control_iterations,
            "trajectories_per_second": config.objective.batch_size / statistics.mean(seconds),
            "macro_f1": result["ctrl"]["macro_f1"], "mean_kl": result["ctrl"]["mean_kl"],
            "optimum_macro_f1": result["optimum"]["macro_f1"],
            "optimum_kl": result["optimum"].get("kl"),
            "eval_samples_per_target": args.eval_samples_per_target,
            "optimum_samples_per_context": args.optimum_samples_per_context}


def _median_time(fn, repeats: int) -> float:
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def value_update_profile(config: FinetuneConfig, batch: int, replay_rollouts: int,
                         repeats: int) -> dict:
    """Where one value update's time goes on a worker's shard of `batch` (single thread):
    UNet calls, the sampler's loop around them, the value head's step (policy rollouts only),
    the reward on every target, and the learner's regression with a replay of
    `replay_rollouts` (copies of one shard: the arithmetic does not depend on the values)."""
    setup = build_setup(config)
    model, objective = setup.model, copy.deepcopy(config.objective)
    objective.batch_size = batch
    inputs = draw_inputs(model, objective, 0)
    steps = inputs.num_steps
    replay_batches = max(1, replay_rollouts // batch)
    x, contexts = inputs.initial_noise, inputs.contexts
    timestep = model.alphas_cumprod.new_tensor(500).long()

    def unet_call():
        with torch.no_grad():
            model.reference_noise(x, timestep, contexts)

    with GlobalFlopCounter() as counter:
        unet_call()
    unet_flops = counter.get_total_flops()

    def base_rollout():
        with torch.no_grad():
            return sample(model, inputs, eta=objective.eta, compute_kl=False,
                          from_reference=True)

    def policy_rollout():
        with torch.no_grad():
            sample(model, inputs, eta=objective.eta, kl_reduction=objective.kl_reduction)

    offsets = inputs.candidate_noise(steps // 2, model.step_candidates // 2) \
        if model.step_candidates else None
    sigma = model.alphas_cumprod.new_tensor(0.1)

    def head_step():
        model.mean_shift(x, sigma, timestep, timestep, contexts, inputs.labels, offsets)

    with GlobalFlopCounter() as counter:
        head_step()
    head_flops = counter.get_total_flops()
    base = base_rollout()

    def targets():
        with torch.no_grad():
            value_rule.target_log_likelihoods(model, setup.reward_fn, base.x0, base.contexts)

    tilt = objective.tilt_exponent(x[0].numel())
    payload = {"states": base.states, "log_targets": tilt * value_rule.target_log_likelihoods(
        model, setup.reward_fn, base.x0, base.contexts), "contexts": base.contexts}

    def learner():
        model.value_head.replay = None
        value_rule.learner_step(model, setup.optimizer, [payload] * replay_batches, objective,
                                torch.Generator().manual_seed(0), 0)

    with GlobalFlopCounter() as counter:
        learner()
    learner_flops = counter.get_total_flops()
    seconds = {name: _median_time(fn, repeats) for name, fn in (
        ("unet_call", unet_call), ("base_rollout", base_rollout),
        ("policy_rollout", policy_rollout), ("head_step", head_step), ("targets", targets),
        ("learner", learner))}
    return {
        "batch": batch, "steps": steps, "step_candidates": model.step_candidates,
        "replay_rollouts": replay_batches * batch, "unet_gflop_per_call": unet_flops / 1e9,
        "head_gflop_per_step": head_flops / 1e9, "learner_gflop": learner_flops / 1e9,
        "seconds": seconds,
        "unet_gflops": unet_flops / seconds["unet_call"] / 1e9,
        "head_gflops": head_flops / seconds["head_step"] / 1e9,
        "learner_gflops": learner_flops / seconds["learner"] / 1e9,
        "base_loop_overhead": seconds["base_rollout"] - steps * seconds["unet_call"],
        "policy_head_share": steps * seconds["head_step"] / seconds["policy_rollout"],
    }


def summarise(rows: list[dict], flops: dict[str, float]) -> list[dict]:
    """Median and spread (min, max) over the repeats of every (rule, setting)."""
    table = []
    for rule in dict.fromkeys(r["rule"] for r in rows):
        single = None
        for workers in SETTINGS:
            runs = [r for r in rows if r["rule"] == rule and r["workers"] == workers]
            if not runs:
                continue
            rates = [r["trajectories_per_second"] for r in runs]
            seconds = statistics.median(r["seconds_per_update"] for r in runs)
            entry = {"rule": rule, "setting": SETTINGS[workers], "workers": workers,
                     "repeats": len(runs), "iterations": runs[0]["iterations"],
                     "trajectories_per_second": statistics.median(rates),
                     "spread": [min(rates), max(rates)],
                     "updates_per_second": 1 / seconds,
                     "gflops": flops[rule] / seconds / 1e9 if rule in flops else None}
            single = entry if workers == 0 else single
            entry["vs_single_process"] = (entry["trajectories_per_second"] /
                                          single["trajectories_per_second"]) if single else None
            table.append(entry)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--base", default="outputs/base-digits16-demo")
    parser.add_argument("--text-config", default="configs/ctrl_text2image_ink.yaml")
    parser.add_argument("--text-base", default="outputs/base-text2image",
                        help="the text testbed's base for the profile ('' skips it)")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--workers", nargs="+", type=int, default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument("--iterations", type=int, default=20, help="timed updates per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--other-rules-iterations", type=int, default=None,
                        help="timed updates for adjoint, pathwise, ppo (default --iterations)")
    parser.add_argument("--other-rules-repeats", type=int, default=None)
    parser.add_argument("--flop-iterations", type=int, default=None,
                        help="updates of the FLOP count (default --iterations; a rule whose "
                             "updates all cost the same needs few)")
    parser.add_argument("--control-iterations", type=int, default=60,
                        help="updates of the value run whose control is measured (the demo's)")
    parser.add_argument("--eval-samples-per-target", type=int, default=4)
    parser.add_argument("--optimum-samples-per-context", type=int, default=100)
    parser.add_argument("--profile-repeats", type=int, default=5)
    parser.add_argument("--out", default="outputs/bench-throughput")
    parser.add_argument("--results-name", default="throughput",
                        help="benchmarks/results/NAME.{json,md} (a partial run: another name)")
    args = parser.parse_args()
    command = " ".join(["python", *sys.argv])
    start = time.perf_counter()
    torch.set_num_threads(1)
    peak_before = matmul_peak()

    profiles = {"digits demo": value_update_profile(
        demo_config(args, "value", 0, 1, f"{args.out}/profile"), 16, REPLAY, args.profile_repeats)}
    print(profiles)
    if args.text_base:
        raw = read_yaml(args.text_config)
        raw.update(base_model=args.text_base, evaluate=False)
        profiles["text testbed"] = value_update_profile(
            from_dict(FinetuneConfig, raw), raw["objective"]["batch_size"], REPLAY,
            args.profile_repeats)
        print(profiles["text testbed"])

    connect("local", num_cpus=4)
    rows, flops = [], {}
    for rule in args.rules:
        other = rule != "value"
        iterations = (args.other_rules_iterations if other else None) or args.iterations
        repeats = (args.other_rules_repeats if other else None) or args.repeats
        flops[rule] = count_update_flops(args, rule, args.flop_iterations or iterations)
        for repeat in range(repeats):
            for workers in args.workers:
                rows.append(run_setting(args, rule, workers, iterations, repeat))
                print(rows[-1], flush=True)
    ray.shutdown()
    control = control_of_default_rule(args) if "value" in args.rules else None
    peak_after = matmul_peak()
    table = summarise(rows, flops)
    peak = max(peak_before["best_gflops"], peak_after["best_gflops"])
    wall = time.perf_counter() - start
    data = {"machine": machine(), "command": command, "wall_seconds": wall,
            "matmul_peak": {"before": peak_before, "after": peak_after, "gflops": peak},
            "update_gflop": {rule: f / 1e9 for rule, f in flops.items()},
            "table": table, "runs": rows, "profiles": profiles, "control": control}
    publish(args.results_name, data, markdown(data, args))


def markdown(data: dict, args) -> list[str]:
    """The results page."""
    peak = data["matmul_peak"]["gflops"]
    lines = [
        "# Training throughput", "",
        f"`{data['command']}` on {data['machine']['date']}, niced, one torch thread per "
        f"process, {data['wall_seconds'] / 60:.0f} min wall time; 1-minute load average "
        f"{data['machine']['load_average_1min']:.1f} on 2 cores shared with other jobs, so "
        f"every figure is a median and the spread is shown. The demo's config "
        f"(`{args.config}`, finetune section, base `{args.base}`): 16x16 digits, batch 32, "
        f"20 DDPM steps; the value rule as the demo runs it (value head, 8 step candidates, "
        f"30 regression steps, report_every 5), the other rules with their defaults (LoRA "
        f"rank 4). Each run times its updates after a warm-up update; trajectories/s = "
        f"batch / mean seconds per update (the value rule's mean includes its report "
        f"updates); median (min-max) over the repeats. FLOP/s = FLOPs per update "
        f"(`FlopCounterMode`, one untimed single-process run of the same updates) / median "
        f"seconds per update; matmul peak: a {MATMUL_SIZE}x{MATMUL_SIZE} fp32 matmul on one "
        f"thread in the same run, best of 7 before and after: **{peak:.1f} GFLOP/s**.", "",
        "| rule | setting | repeats x updates | trajectories/s (min-max) | updates/s | "
        "vs single process | GFLOP/update | GFLOP/s | % of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|"]
    for row in data["table"]:
        gflop = data["update_gflop"].get(row["rule"])
        rate = row["gflops"]
        lines.append(
            f"| {row['rule']} | {row['setting']} | {row['repeats']} x {row['iterations']} | "
            f"{row['trajectories_per_second']:.2f} ({row['spread'][0]:.2f}-"
            f"{row['spread'][1]:.2f}) | {row['updates_per_second']:.3f} | "
            f"{row['vs_single_process']:.2f}x | {gflop:.1f} | {rate:.1f} | "
            f"{100 * rate / peak:.0f}% |")
    control = data["control"]
    if control:
        lines += [
            "", "## The default rule's speed next to its control", "",
            f"The value rule, {control['iterations']} updates in one process (one thread), "
            f"then evaluated on the demo's evaluation seeds with "
            f"{control['eval_samples_per_target']} samples per (ink class, digit); the exact "
            f"optimum on the same seeds from {control['optimum_samples_per_context']} base "
            f"samples per digit (small counts: the F1s carry a few hundredths of noise).", "",
            "| trajectories/s | macro-F1 | KL (nats) | optimum macro-F1 | optimum KL |",
            "|---|---|---|---|---|",
            f"| {control['trajectories_per_second']:.2f} | {control['macro_f1']:.3f} | "
            f"{control['mean_kl']:.2f} | {control['optimum_macro_f1']:.3f} | "
            f"{_number(control['optimum_kl'])} |"]
    lines += ["", "## Where a value update's time goes (one thread)", "",
              "Median of repeated calls on one worker's shard. UNet GFLOP/s is one call's "
              "FLOPs over its time; the loop overhead is a base rollout's time beyond its "
              "UNet calls; the head's step runs only in policy rollouts (every "
              "report_every-th update); the learner's regression with the replay a 60-update "
              "run of batch 32 holds (its held-out check reads every state of up to 256 "
              "held-out rollouts).", "",
              "| testbed | shard | UNet call | UNet GFLOP/s (% of peak) | base rollout | "
              "loop overhead | policy rollout | head's step (share) | reward, every target | "
              "learner (replay) | learner GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in data["profiles"].items():
        s = p["seconds"]
        lines.append(
            f"| {name} | {p['batch']} x {p['steps']} steps | {1e3 * s['unet_call']:.1f} ms "
            f"({p['unet_gflop_per_call']:.2f} GFLOP) | {p['unet_gflops']:.1f} "
            f"({100 * p['unet_gflops'] / peak:.0f}%) | {s['base_rollout']:.2f} s | "
            f"{p['base_loop_overhead']:.2f} s | {s['policy_rollout']:.2f} s | "
            f"{p['steps'] * s['head_step']:.2f} s ({100 * p['policy_head_share']:.0f}%) | "
            f"{1e3 * s['targets']:.0f} ms | {s['learner']:.2f} s ({p['replay_rollouts']}) | "
            f"{p['learner_gflops']:.1f} |")
    lines += ["", "Full run: `nice -n 5 .venv/bin/python benchmarks/throughput.py` "
              "(all four rules, 3 repeats x 20 updates, every setting)."]
    return lines


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
