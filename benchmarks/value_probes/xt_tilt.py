"""How far is each policy's x_T from the optimum's? A floor under its distance to the optimum.

J* - J = kl_weight KL(pi || pi*) over whole paths, and by the chain rule that KL is the KL of
the x_T marginals plus the expected KL of the steps after it: however well the later steps
steer, a policy whose x_T is not distributed as the optimum's is at least KL(pi_T || pi*_T)
from it. The optimum draws x_T from N(0, I) h_T(x) / Z; the value policy from N(s, I), s its
head's estimate of the tilted prior's mean. Per digit c and target y, on M draws x_i ~ N(0, I)
with R base continuations each (h_T(x_i) = mean_r p(y | x0_r)^lambda, whose log is biased
low, so that every floor is over-estimated, the less the larger R: the base's floor is also
printed at R / 4 and R / 2), this prints

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
    """(x_T draws (M, *shape), lambda log p(y | x0) of each draw's R continuations for every
    target (M, R, J), and sqrt(a_T) (E*[x0] - E[x0]) for every target (J, *shape) from the
    continuations' x0)."""
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
    return x_initial, log_p, shift_x0


def estimate_log_h(log_p: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """log h_T of each draw (M, J): the log of the mean of p^lambda over its first ``count``
    continuations (all by default). Its expectation lies below log h (Jensen), so every floor
    below is over-estimated, by less the more continuations there are."""
    log_p = log_p[:, :count]
    return torch.logsumexp(log_p, 1) - math.log(log_p.shape[1])


def cached_log_h(setup, config, args, digit: int) -> tuple[torch.Tensor, ...]:
    """`log_h_initial` of one digit, kept under ``--cache`` (its continuations are the cost)."""
    overrides = hashlib.sha1(" ".join(args.overrides).encode()).hexdigest()[:8]
    path = Path(args.cache) / (f"{Path(args.config).stem}-{overrides}-digit{digit}-"
                               f"m{args.draws}-r{args.continuations}.pt")
    if path.exists():
        saved = torch.load(path)
        return saved["x"], saved["log_p"], saved["shift_x0"]
    x, log_p, shift_x0 = log_h_initial(setup, config, digit, args.draws, args.continuations,
                                       500 + digit)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "log_p": log_p, "shift_x0": shift_x0}, path)
    return x, log_p, shift_x0


def base_floor(log_h: torch.Tensor) -> float:
    """KL(N(0, I) || pi*_T) = log Z - E[log h_T], mean over targets."""
    return (torch.logsumexp(log_h, 0) - math.log(len(log_h)) - log_h.mean(0)).mean().item()


def tilt_floor(log_tilt: torch.Tensor, log_h: torch.Tensor,
               log_z: torch.Tensor) -> tuple[float, float]:
    """(KL(q || pi*_T), KL(q || N(0, I))) for q = N(0, I) exp(log_tilt) / Z_q, log_tilt (M, J) on
    the draws: what importance resampling x_T among many base draws by that tilt samples."""
    log_tilt = log_tilt.double()
    weights = torch.softmax(log_tilt, 0)
    log_z_tilt = torch.logsumexp(log_tilt, 0) - math.log(len(log_tilt))
    to_base = (weights * log_tilt).sum(0) - log_z_tilt
    to_optimum = to_base - (weights * log_h).sum(0) + log_z
    return to_optimum.mean().item(), to_base.mean().item()


def head_log_value(policy, config, digit: int, x: torch.Tensor, at_x0: bool) -> torch.Tensor:
    """The policy's head, log h for every target (M, J): at x_T itself, or (``at_x0``) at t = 0 on
    the base's first denoised estimate x0_hat(x_T) (clipped as the sampler clips it)."""
    schedule = DenoisingSchedule.create(policy.alphas_cumprod,
                                        config.objective.num_inference_steps,
                                        config.objective.eta)
    digits = torch.full((len(x),), digit)
    with torch.no_grad():
        if at_x0:
            t = schedule.timesteps[0].expand(len(x))
            x = schedule.denoised(0, x, policy.reference_noise(x, t, digits), policy.clip_sample)
        log_q, log_m = policy.value_head(x, torch.zeros(()) if at_x0 else schedule.timesteps[0],
                                         policy.head_context(digits))
    return log_q + log_m[:, None]


def denoised_reward(setup, config, digit: int, x: torch.Tensor) -> torch.Tensor:
    """lambda log p(y | x0_hat(x_T)) for every target (M, J): the reward on the base's first
    denoised estimate (clipped as the sampler clips it)."""
    model, objective = setup.model, config.objective
    schedule = DenoisingSchedule.create(model.alphas_cumprod, objective.num_inference_steps,
                                        objective.eta)
    digits = torch.full((len(x),), digit)
    with torch.no_grad():
        t = schedule.timesteps[0].expand(len(x))
        x0_hat = schedule.denoised(0, x, model.reference_noise(x, t, digits), model.clip_sample)
        return objective.tilt_exponent(math.prod(model.sample_shape)) * \
            target_log_likelihoods(model, setup.reward_fn, x0_hat, digits)


TEMPERATURES = (0.25, 0.5, 1.0, 2.0)   # multiples of a tilt's log, the floor's best reported


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
        x, log_p, shift_x0 = cached_log_h(setup, config, args, digit)
        log_h = estimate_log_h(log_p)
        # the base's floor from fewer continuations: how far the estimate still moves with R
        counts = [args.continuations // 4, args.continuations // 2, args.continuations]
        by_count = [base_floor(estimate_log_h(log_p, c)) for c in counts]
        inverse = torch.tensor([[1.0, 1 / c] for c in counts], dtype=torch.float64)
        limit = torch.linalg.lstsq(inverse, torch.tensor(by_count, dtype=torch.float64)[:, None])
        log_z = torch.logsumexp(log_h, 0) - math.log(len(log_h))
        reward_tilt = denoised_reward(setup, config, digit, x)
        weights = torch.softmax(log_h, 0)                          # (M, J): the tilted prior
        ess = 1 / (weights**2).sum(0)
        # E*[x_T] in 256 dimensions from M weighted draws is mostly noise (|noise|^2 ~ d / ESS);
        # its projection onto 4x4-pixel blocks keeps x_T's low frequencies at 1/16 the noise
        tilted_mean = blocks(torch.einsum("mj,m...->j...", weights, x.double()).float())
        row = {"digit": digit, "ess_min": float(ess.min()),
               "base_by_continuations": dict(zip(map(str, counts), by_count, strict=True)),
               "base_extrapolated": float(limit.solution[0, 0]),
               "optimum_kl": ((weights * log_h).sum(0) - log_z).mean().item(),
               "base": floor(log_h, x, torch.zeros_like(tilted_mean), log_z).mean().item(),
               "tilted_mean": floor(log_h, x, tilted_mean, log_z).mean().item(),
               "tilted_mean_kl": ((tilted_mean**2).flatten(1).sum(1) / 2).mean().item(),
               "from_x0": floor(log_h, x, shift_x0, log_z).mean().item(),
               "denoised_reward": {f"{m:g}": tilt_floor(m * reward_tilt, log_h, log_z)
                                   for m in TEMPERATURES},
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
            for where in ("x_T", "x0_hat"):
                log_head = head_log_value(policy, config, digit, x, where == "x0_hat")
                row["policies"][path][f"head_{where}"] = {
                    f"{m:g}": tilt_floor(m * log_head, log_h, log_z) for m in TEMPERATURES}
        rows.append(row)
        print(digit, {k: v for k, v in row.items() if k != "policies"},
              {p: {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
               for p, r in row["policies"].items()},
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
             "policy's KL(pi || pi*) = (J* - J) / kl_weight; every number here is an estimate "
             "that the continuations' noise pushes up (see the table by R below).", "",
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
    def best(key_rows: list[dict]) -> str:
        """The temperature with the lowest mean floor: 'floor (KL to N(0, I)) at xm'."""
        means = {m: (mean(k[m][0] for k in key_rows), mean(k[m][1] for k in key_rows))
                 for m in key_rows[0]}
        m = min(means, key=lambda key: means[key][0])
        return f"{means[m][0]:.3f} | {means[m][1]:.3f} | x{m}"

    lines += ["", "x_T resampled among many base draws by a tilt exp(m f) (what importance "
              "resampling would sample; m the best of " + ", ".join(f"{m:g}" for m in TEMPERATURES)
              + " on these draws, so the floor is slightly optimistic):", "",
              "| tilt f | floor | KL to N(0, I) | m |", "|---|---|---|---|",
              f"| lambda log p(y \\| x0_hat(x_T)), the reward on the base's first denoised "
              f"estimate | {best([r['denoised_reward'] for r in rows])} |"]
    for path in rows[0]["policies"]:
        for where, words in (("x_T", "the head at x_T"),
                             ("x0_hat", "the head at t = 0 on x0_hat(x_T)")):
            lines.append(f"| {words}: {path} | "
                         f"{best([r['policies'][path][f'head_{where}'] for r in rows])} |")
    counts = list(rows[0]["base_by_continuations"])
    lines += ["", "The base's floor by continuations per draw (a + b / R fitted to the three and "
              "read at R -> infinity; the estimate falls faster than 1 / R, so the fit "
              "undershoots):", "",
              "| " + " | ".join(f"R = {c}" for c in counts) + " | extrapolated |",
              "|---" * (len(counts) + 1) + "|",
              "| " + " | ".join(f"{mean(r['base_by_continuations'][c] for r in rows):.3f}"
                                for c in counts)
              + f" | {mean(r['base_extrapolated'] for r in rows):.3f} |"]
    lines += ["", "Per digit (the optimum's x_T KL, the base's floor, the first policy's floor):",
              "", "| digit | ESS min | optimum's x_T KL | base's floor | extrapolated | "
              "from the x0 | policy's floor |", "|---|---|---|---|---|---|---|"]
    first = next(iter(rows[0]["policies"]), None)
    for r in rows:
        policy_floor = f"{r['policies'][first]['floor']:.3f}" if first else "-"
        lines.append(f"| {r['digit']} | {r['ess_min']:.0f} | {r['optimum_kl']:.3f} | "
                     f"{r['base']:.3f} | {r['base_extrapolated']:.3f} | "
                     f"{r['from_x0']:.3f} | {policy_floor} |")
    return lines


if __name__ == "__main__":
    main()
