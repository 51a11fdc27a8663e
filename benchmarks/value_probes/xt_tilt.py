"""How far is each policy's x_T from the optimum's? A floor under its distance to the optimum.

J* - J = kl_weight KL(pi || pi*) over whole paths, and by the chain rule that KL is the KL of
the x_T marginals plus the expected KL of the steps after it: however well the later steps
steer, a policy whose x_T is not distributed as the optimum's is at least KL(pi_T || pi*_T)
from it. The optimum draws x_T from N(0, I) h_T(x) / Z; the value policy from N(s, I), s its
head's estimate of the tilted prior's mean. Per digit c and target y, on M draws x_i ~ N(0, I)
with R base continuations each (h_T(x_i) = mean_r p(y | x0_r)^lambda, jackknifed over two
halves of the continuations against the log's bias), this prints

    KL(pi*_T || N(0, I)) = E*[log h_T] - log Z                       (the optimum's x_T KL)
    KL(N(s, I) || pi*_T) = |s|^2 / 2 - E_N(s, I)[log h_T] + log Z     (the floor, any s)

for s = 0 (the base), s = each policy's (its `initial_shift`, as it samples; and x2, x4) and
s = the tilted prior's own mean E*[x_T] on 4x4-pixel blocks (a Gaussian mean shift in x_T's
low frequencies), the E_N(s, I) by importance
weights exp(s . x - |s|^2 / 2) on the same draws. Nats, mean over digits and targets (at
kl_weight 1, the units of J* - J).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/xt_tilt.py CONFIG POLICY... \
        --name NAME [--digits 0 1 ... 9] [--draws 256] [--continuations 16]

Writes benchmarks/results/xt_tilt_NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import machine, publish  # noqa: E402

from ctrl_ray.config import load_config  # noqa: E402
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup  # noqa: E402
from ctrl_ray.objectives.value import target_log_likelihoods  # noqa: E402
from ctrl_ray.policy import load_any  # noqa: E402
from ctrl_ray.sampling.sampler import DenoisingSchedule, step_mean  # noqa: E402

SCALES = (2, 4)   # the policy's own shift, multiplied


def log_h_initial(setup, config, digit: int, draws: int, continuations: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_T draws (M, *shape), jackknifed log h_T of each draw for every target (M, J), and
    sqrt(a_T) (E*[x0] - E[x0]) for every target (J, *shape) from the continuations' x0)."""
    model, objective = setup.model.eval(), config.objective
    tilt = objective.tilt_exponent(math.prod(model.sample_shape))
    schedule = DenoisingSchedule.create(model.alphas_cumprod, objective.num_inference_steps,
                                        objective.eta)
    generator = torch.Generator().manual_seed(seed)
    x_initial = torch.randn(draws, *model.sample_shape, generator=generator)
    rows, weighted, plain = [], 0.0, 0.0
    for chunk in x_initial.split(max(1, 2048 // continuations)):
        x = chunk.repeat_interleave(continuations, 0)
        contexts = torch.full((len(x),), digit)
        with torch.no_grad():
            for step in range(objective.num_inference_steps):
                mean = step_mean(schedule, step, model.reference_noise, x, contexts,
                                 model.clip_sample)
                x = mean + schedule.sigmas[step] * torch.randn(x.shape, generator=generator)
            log_p = tilt * target_log_likelihoods(model, setup.reward_fn, x, contexts)
        rows.append(log_p.double().view(len(chunk), continuations, -1))
        # E*[x0] accumulated with weights p^lambda / max (the max is the reward's ceiling, 1)
        weighted = weighted + torch.einsum("nj,n...->j...", log_p.double().exp(), x.double())
        plain = plain + x.double().sum(0)
    log_p = torch.cat(rows)
    mass = log_p.exp().flatten(0, 1).sum(0).view(-1, *[1] * (x.dim() - 1))
    alpha = schedule.alphas[0].double()
    shift_x0 = (alpha.sqrt() * (weighted / mass - plain / log_p[..., 0].numel())).float()

    def log_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(values, 1) - math.log(values.shape[1])

    half = continuations // 2
    halves = (log_mean(log_p[:, :half]) + log_mean(log_p[:, half:])) / 2
    return x_initial, 2 * log_mean(log_p) - halves, shift_x0


def cached_log_h(setup, config, args, digit: int) -> tuple[torch.Tensor, ...]:
    """`log_h_initial` of one digit, kept under ``--cache`` (its continuations are the cost)."""
    overrides = hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:8]
    path = Path(args.cache) / (f"{Path(args.config).stem}-{overrides}-digit{digit}-"
                               f"m{args.draws}-r{args.continuations}.pt")
    if path.exists():
        saved = torch.load(path)
        return saved["x"], saved["log_h"], saved["shift_x0"]
    x, log_h, shift_x0 = log_h_initial(setup, config, digit, args.draws, args.continuations,
                                       500 + digit)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "log_h": log_h, "shift_x0": shift_x0}, path)
    return x, log_h, shift_x0


def head_tilt(policy, config, digit: int, x: torch.Tensor, log_h: torch.Tensor,
              log_z: torch.Tensor, scale: float) -> tuple[float, float]:
    """(KL(q || pi*_T), KL(q || N(0, I))) for q = N(0, I) h_head^scale / Z_head, the tilted prior
    by the policy's own head (what resampling x_T among many base draws by it would sample),
    on the same draws."""
    t = DenoisingSchedule.create(policy.alphas_cumprod, config.objective.num_inference_steps,
                                 config.objective.eta).timesteps[0]
    contexts = policy.head_context(torch.full((len(x),), digit))
    with torch.no_grad():
        log_q, log_m = policy.value_head(x, t, contexts)
    log_head = scale * (log_q + log_m[:, None]).double()                  # (M, J)
    weights = torch.softmax(log_head, 0)
    log_z_head = torch.logsumexp(log_head, 0) - math.log(len(x))
    to_base = (weights * log_head).sum(0) - log_z_head
    to_optimum = to_base - (weights * log_h).sum(0) + log_z
    return to_optimum.mean().item(), to_base.mean().item()


def floor(log_h: torch.Tensor, x: torch.Tensor, shift: torch.Tensor,
          log_z: torch.Tensor) -> torch.Tensor:
    """KL(N(s, I) || pi*_T) per target (J,) for shifts s (J, *shape), by weights on N(0, I)."""
    flat, shift = x.flatten(1).double(), shift.flatten(1).double()
    log_w = flat @ shift.T - (shift**2).sum(1) / 2            # (M, J): log N(s) / N(0)
    weights = torch.softmax(log_w, 0)
    return (shift**2).sum(1) / 2 - (weights * log_h).sum(0) + log_z


def blocks(x: torch.Tensor, size: int = 4) -> torch.Tensor:
    """x projected onto piecewise-constant size x size pixel blocks (its low frequencies)."""
    pooled = torch.nn.functional.avg_pool2d(x, size)
    return torch.nn.functional.interpolate(pooled, scale_factor=size, mode="nearest")


def policy_shift(policy, config, digit: int, candidates: int, seed: int) -> torch.Tensor:
    """The policy's x_T shift for every target of its head (J, *shape), as it samples."""
    targets = policy.value_head.spec.targets
    size = len(targets)
    labels = {name: torch.tensor([t[i] for t in targets])
              for i, name in enumerate(policy.label_classes)}
    offsets = torch.randn(candidates // 2, size, *policy.sample_shape,
                          generator=torch.Generator().manual_seed(seed))
    t = DenoisingSchedule.create(policy.alphas_cumprod, config.objective.num_inference_steps,
                                 config.objective.eta).timesteps[0]
    with torch.no_grad():
        shift = policy.initial_shift(torch.zeros(size, *policy.sample_shape), t,
                                     torch.full((size,), digit), labels, offsets)
    return torch.zeros(size, *policy.sample_shape) if shift is None else shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("policies", nargs="*")
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--draws", type=int, default=256)
    parser.add_argument("--continuations", type=int, default=16)
    parser.add_argument("--cache", default="outputs/probe/xt_tilt",
                        help="where each digit's draws and log h_T are kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)
    policies = {path: load_any(path).model.eval() for path in args.policies}
    rows = []
    for digit in args.digits:
        x, log_h, shift_x0 = cached_log_h(setup, config, args, digit)
        log_z = torch.logsumexp(log_h, 0) - math.log(len(log_h))
        weights = torch.softmax(log_h, 0)                          # (M, J): the tilted prior
        ess = 1 / (weights**2).sum(0)
        # E*[x_T] in 256 dimensions from M weighted draws is mostly noise (|noise|^2 ~ d / ESS);
        # its projection onto 4x4-pixel blocks keeps x_T's low frequencies at 1/16 the noise
        tilted_mean = blocks(torch.einsum("mj,m...->j...", weights, x.double()).float())
        row = {"digit": digit, "ess_min": float(ess.min()),
               "optimum_kl": ((weights * log_h).sum(0) - log_z).mean().item(),
               "base": floor(log_h, x, torch.zeros_like(tilted_mean), log_z).mean().item(),
               "tilted_mean": floor(log_h, x, tilted_mean, log_z).mean().item(),
               "tilted_mean_kl": ((tilted_mean**2).flatten(1).sum(1) / 2).mean().item(),
               "from_x0": floor(log_h, x, shift_x0, log_z).mean().item(),
               "from_x0_kl": ((shift_x0**2).flatten(1).sum(1) / 2).mean().item(),
               "policies": {}}
        for path, policy in policies.items():
            shift = policy_shift(policy, config, digit, policy.initial_candidates or 32,
                                 900 + digit)
            row["policies"][path] = {
                "floor": floor(log_h, x, shift, log_z).mean().item(),
                **{f"floor_x{scale:g}": floor(log_h, x, scale * shift, log_z).mean().item()
                   for scale in SCALES},
                "kl": ((shift**2).flatten(1).sum(1) / 2).mean().item(),
                "cosine": torch.nn.functional.cosine_similarity(
                    shift.flatten(1), tilted_mean.flatten(1)).mean().item()}
            for scale in (1, 2):
                row["policies"][path][f"head_tilt_x{scale}"], \
                    row["policies"][path][f"head_tilt_x{scale}_kl"] = head_tilt(
                        policy, config, digit, x, log_h, log_z, scale)
        rows.append(row)
        print(digit, {k: v for k, v in row.items() if k != "policies"},
              {p: {k: round(v, 3) for k, v in r.items()} for p, r in row["policies"].items()},
              flush=True)
    publish(f"xt_tilt_{args.name}", {"machine": machine(), "command": " ".join(sys.argv),
                                     "args": vars(args), "rows": rows}, markdown(rows, args))


def markdown(rows: list[dict], args) -> list[str]:
    """Means over digits (each already a mean over targets)."""
    def mean(values) -> float:
        return statistics.mean(values)

    lines = [f"# The x_T tilt: {args.name}", "",
             f"`python benchmarks/value_probes/xt_tilt.py {args.config} ... --name {args.name} "
             f"--draws {args.draws} --continuations {args.continuations}` on "
             f"{machine()['date']}: digits {args.digits}, every target; ESS of the tilted prior "
             f"on the draws, smallest {min(r['ess_min'] for r in rows):.0f}. Nats, mean over "
             "(digit, target). The floor is KL(N(s, I) || pi*_T), a lower bound on the "
             "policy's KL(pi || pi*) = (J* - J) / kl_weight.", "",
             f"The optimum's own x_T KL, KL(pi*_T || N(0, I)): "
             f"**{mean(r['optimum_kl'] for r in rows):.3f}**", "",
             "| x_T drawn from | its KL to N(0, I) | cosine to E*[x_T] | floor | "
             + " | ".join(f"floor, shift x{s:g}" for s in SCALES) + " |",
             "|---" * (4 + len(SCALES)) + "|",
             f"| N(0, I) (the base) | 0 | - | {mean(r['base'] for r in rows):.3f} |"
             + " - |" * len(SCALES),
             f"| N(E*[x_T], I), E* on 4x4 blocks | "
             f"{mean(r['tilted_mean_kl'] for r in rows):.3f} | 1 | "
             f"{mean(r['tilted_mean'] for r in rows):.3f} |" + " - |" * len(SCALES),
             f"| N(sqrt(a_T) (E*[x0] - E[x0]), I), from the x0 | "
             f"{mean(r['from_x0_kl'] for r in rows):.3f} | - | "
             f"{mean(r['from_x0'] for r in rows):.3f} |" + " - |" * len(SCALES)]
    for path in rows[0]["policies"]:
        keys = ("kl", "cosine", "floor", *(f"floor_x{s:g}" for s in SCALES))
        cells = [mean(r["policies"][path][key] for r in rows) for key in keys]
        lines.append(f"| {path} | {cells[0]:.3f} | {cells[1]:.2f} | "
                     + " | ".join(f"{c:.3f}" for c in cells[2:]) + " |")
    lines += ["", "x_T resampled by the policy's own head (N(0, I) h_head^s / Z_head: what "
              "importance resampling among many base draws would sample):", "",
              "| policy | s | KL to N(0, I) | floor |", "|---|---|---|---|"]
    for path in rows[0]["policies"]:
        for scale in (1, 2):
            floor_value = mean(r["policies"][path][f"head_tilt_x{scale}"] for r in rows)
            kl = mean(r["policies"][path][f"head_tilt_x{scale}_kl"] for r in rows)
            lines.append(f"| {path} | {scale} | {kl:.3f} | {floor_value:.3f} |")
    lines += ["", "Per digit (the optimum's x_T KL, the base's floor, the first policy's floor):",
              "", "| digit | ESS min | optimum's x_T KL | base's floor | from the x0 | "
              "policy's floor |", "|---|---|---|---|---|---|"]
    first = next(iter(rows[0]["policies"]), None)
    for r in rows:
        policy_floor = f"{r['policies'][first]['floor']:.3f}" if first else "-"
        lines.append(f"| {r['digit']} | {r['ess_min']:.0f} | {r['optimum_kl']:.3f} | "
                     f"{r['base']:.3f} | {r['from_x0']:.3f} | {policy_floor} |")
    return lines


if __name__ == "__main__":
    main()
