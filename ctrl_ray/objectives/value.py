"""Value CTRL: learn the soft value of the pre-trained chain by regression on its own rollouts,
and steer every reverse step by it (the policy's adapter ``value``).

The optimum of J = E[gamma log p(y | x0, c)] - kl_weight KL(P_theta || P_pre) is the base chain
tilted by h_t(x; y, c) = E_pre[p(y | x0, c)^lambda | x_t = x, c], lambda = gamma / kl_weight:
its step from x_k draws x_{k+1} from N(mu_pre(x_k), sigma_k^2 I) h_{k+1}(x_{k+1}) / h_k(x_k),
whose Gaussian approximation with the base's variance has that step's mean,
mu_pre + sigma_k^2 E_tilted[grad log h_{k+1}] (sigma_k^2 grad log h_{k+1}(mu_pre) to first order
in sigma_k; `SoftValueNet.mean_shift`). The policy is that step with a learned h
(`ctrl_ray.models.soft_value`), so fine-tuning is learning h, and h is a conditional
expectation under the *base* chain: a regression of lambda log p(y | x0) of base rollouts onto
every state x_k of the rollout (`value_loss`), for every target y at once. No gradient passes
through the sampler or the reward classifier, the targets are exact (not one-trajectory
estimates), and nothing drifts where the reward is flat (there h is constant and the control
zero). `docs/update_rules.md`, section 6, measures how close it gets to the optimum and why
Adjoint Matching's adapter lags further behind.

A rollout worker samples its shard with the batch's noise from the base model (the regression
data: states, contexts and lambda log p(y | x0) for every y) and, when the driver asks for a
report (every ``report_every`` updates), from the current policy (the reward and KL the run
reports; the fit never sees them). The learner adds the shards to a replay of the newest base
rollouts within ``replay_rollouts`` and ``replay_bytes`` (exact data forever: they do not depend
on the policy; `ctrl_ray.objectives.replay`), saved with every training checkpoint, and takes
``regression_steps`` AdamW steps on random (state, timestep) pairs of it (a share of the
states drawn afresh from the forward process of the rollout's x_0), keeping the weights
that do best on held-out rollouts (the check's forward passes in bf16 where it is native).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ctrl_ray import data_parallel
from ctrl_ray.errors import InputError
from ctrl_ray.models.soft_value import value_loss
from ctrl_ray.objectives.base import clip_and_step
from ctrl_ray.objectives.configs import ValueConfig
from ctrl_ray.objectives.pathwise import RewardFn
from ctrl_ray.objectives.replay import Replay
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample


def target_log_likelihoods(model, reward_fn: RewardFn, x0: torch.Tensor,
                           contexts: torch.Tensor | None) -> torch.Tensor:
    """log p(y | x0, c) of every sample for every target y of the value head, (B, J)."""
    names = list(model.label_classes)
    size = x0.shape[0]
    return torch.stack([
        reward_fn(x0, {name: torch.full((size,), k, dtype=torch.long, device=x0.device)
                       for name, k in zip(names, target, strict=True)}, contexts)
        for target in model.value_head.spec.targets], dim=1)


# -- the update rule's two halves (see ctrl_ray.objectives) ---------------------------------
Config = ValueConfig


def worker_step(model, reward_fn: RewardFn, inputs: RolloutInputs, config: ValueConfig,
                normaliser: int, version: int, report: bool = True) -> tuple[dict, dict]:
    """Sample the shard with the base model (the regression data, on CPU) and, if ``report``,
    with the policy (its reward and KL: metrics only; the base rollouts' own while the head is
    untrained, since the policy is the base then)."""
    if getattr(model, "value_head", None) is None:
        raise InputError("mode value trains a value head: set adapter.kind: value")
    if inputs.num_steps != config.num_inference_steps:
        raise InputError(f"inputs have {inputs.num_steps} steps of noise but "
                         f"num_inference_steps is {config.num_inference_steps}")
    # the head's targets: (target_power lambda) log p(y | x0) for every y
    tilt = config.tilt_exponent(math.prod(model.sample_shape)) * model.value_head.spec.target_power
    with torch.no_grad():
        base = sample(model, inputs, eta=config.eta, compute_kl=False, from_reference=True)
        log_targets = tilt * target_log_likelihoods(model, reward_fn, base.x0, base.contexts)
    payload = {"states": base.states.cpu(), "log_targets": log_targets.float().cpu(),
               "contexts": None if base.contexts is None else base.contexts.cpu()}
    if not report:
        return payload, {"num_samples": float(inputs.batch_size)}
    with torch.no_grad():
        if model.value_head.is_flat():   # an untrained head: the policy is the base exactly
            policy, path_kl = base, torch.zeros(inputs.batch_size, device=base.x0.device)
        else:
            policy = sample(model, inputs, eta=config.eta, kl_reduction=config.kl_reduction)
            path_kl = policy.path_kl
        log_likelihood = reward_fn(policy.x0, policy.labels, policy.contexts)
    return payload, {
        "reward": log_likelihood.mean().item(),
        "kl": path_kl.mean().item(),
        "objective": (config.gamma * log_likelihood - config.kl_weight * path_kl).mean().item(),
        "num_samples": float(inputs.batch_size),
    }


def learner_step(model, optimizer: torch.optim.Optimizer, payloads: list[dict],
                 config: ValueConfig, generator: torch.Generator, version: int) -> dict:
    """Add the shards' base rollouts to the replay (kept on the value head, outside its
    weights; `learner_state` saves it), then up to ``regression_steps`` steps of the value loss
    on random (state, timestep) pairs of its fit rollouts (x_T .. x_0 of each). Every
    ``check_every`` steps the loss on the held-out rollouts is measured and the head keeps its
    best weights of the update (the ones it came in with included): an over-fit h steers where
    the reward says nothing, which costs KL and buys no control (docs/update_rules.md,
    section 7). ``check_patience`` checks in a row without a better loss end the fit."""
    head = model.value_head
    device = next(head.parameters()).device
    replay = _replay(head, config)
    replay.add(payloads)
    states, log_targets, contexts = (replay.buffers.get(name) for name in
                                     ("states", "log_targets", "contexts"))
    schedule = DenoisingSchedule.create(model.alphas_cumprod.cpu(), states.shape[0] - 1,
                                        config.eta)
    timesteps = torch.cat([schedule.timesteps, schedule.timesteps.new_zeros(1)]).long()
    # a_t of each state for the forward process; x_0 is the sample itself
    alphas = torch.cat([schedule.alphas, schedule.alphas.new_ones(1)])
    slots = replay.slots()   # ring slots in arrival order
    held = replay.heldout_buffer[slots]
    fit_rows, heldout_rows = slots[~held], slots[held]
    if not len(fit_rows):   # the first batch of a tiny run can be all held out
        fit_rows, heldout_rows = heldout_rows, heldout_rows[:0]

    def loss_on(rows: torch.Tensor, which: torch.Tensor, bf16: bool = False,
                x: torch.Tensor | None = None) -> torch.Tensor:
        context = None if contexts is None else model.head_context(contexts[rows])
        x = states[which, rows] if x is None else x
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return value_loss(head, x.to(device), timesteps[which].to(device),
                              None if context is None else context.to(device),
                              log_targets[rows].to(device))

    # The held-out pairs: states of up to 256 held-out rollouts, fixed within the update; a
    # random `heldout_pairs` of them, drawn from the version's own generator so that the fit's
    # draws do not depend on the check's size.
    heldout_rows = heldout_rows[-config.heldout_rollouts:]
    check_bf16 = config.check_bf16 and native_bf16(device)
    check_rows = heldout_rows.repeat_interleave(timesteps.numel())
    check_which = torch.arange(timesteps.numel()).repeat(len(heldout_rows))
    if 0 < config.heldout_pairs < len(check_rows):
        chosen = torch.randperm(len(check_rows), generator=torch.Generator().manual_seed(
            version))[:config.heldout_pairs].sort().values
        check_rows, check_which = check_rows[chosen], check_which[chosen]

    def heldout_loss() -> float:
        """The mean loss over the held-out pairs, in chunks (SD-sized latents stay bounded);
        each learner rank measures its share and the sum is taken over ranks."""
        if not len(check_rows):
            return float("nan")
        start, stop = data_parallel.share_bounds(len(check_rows))
        with torch.no_grad():
            mine = sum(loss_on(rows, which, check_bf16).item() * len(rows)
                       for rows, which in zip(
                check_rows[start:stop].split(1024), check_which[start:stop].split(1024),
                strict=True))
        return data_parallel.total(mine) / len(check_rows)

    best_loss = start_loss = heldout_loss()
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    total, norms, steps, kept, worse = 0.0, 0.0, 0, 0, 0
    while steps < config.regression_steps and not (config.check_patience and
                                                   worse >= config.check_patience):
        for _ in range(min(config.check_every, config.regression_steps - steps)):
            pick = torch.randint(0, len(fit_rows), (config.regression_batch_size,),
                                 generator=generator)
            which = torch.randint(0, timesteps.numel(), (config.regression_batch_size,),
                                  generator=generator)
            x = forward_noised(states, fit_rows[pick], which, alphas,
                               config.forward_noise_fraction, generator) \
                if config.forward_noise_fraction > 0 else states[which, fit_rows[pick]]
            (pick, which, x), weight = data_parallel.share(pick, which, x)
            optimizer.zero_grad(set_to_none=True)
            if len(pick):
                loss = loss_on(fit_rows[pick], which, x=x) * weight
                loss.backward()
            norms += clip_and_step(optimizer, config.max_grad_norm)
            total += data_parallel.total(loss.item() if len(pick) else 0.0)
            steps += 1
        checked = heldout_loss()
        if not len(check_rows) or checked <= best_loss:   # a NaN loss is never taken
            best_loss, kept, worse = checked, steps, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            worse += 1
    head.load_state_dict(best_state)
    metrics = {"loss": total / steps, "grad_norm": norms / steps, "head_steps": float(steps),
               "replay_rollouts": float(replay.count)}
    if len(check_rows):
        metrics.update(heldout_loss=best_loss, heldout_loss_before=start_loss,
                       kept_steps=float(kept))
    return metrics


def forward_noised(states: torch.Tensor, rows: torch.Tensor, which: torch.Tensor,
                   alphas: torch.Tensor, fraction: float | torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The states `which` of the rollouts `rows`, a `fraction` of them (or a fraction per state
    index, (S + 1,)) drawn afresh from the forward process, sqrt(a_t) x_0 + sqrt(1 - a_t) eps,
    of their rollout's x_0. Under the
    base the pairs (x_t, x_0) of its chain and of the forward process share one joint, so
    either is regression data for h_t; the forward process gives every rollout new states at
    every step instead of its S fixed ones (docs/update_rules.md, section 18)."""
    x = states[which, rows]
    if isinstance(fraction, torch.Tensor):
        fraction = fraction[which]
    noised = torch.rand(len(rows), generator=generator) < fraction
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    a = alphas[which].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    fresh = a.sqrt() * states[-1, rows] + (1 - a).sqrt() * noise
    return torch.where(noised.view(-1, *[1] * (x.dim() - 1)), fresh, x)


def final_fit(model, config: ValueConfig, seed: int) -> dict:
    """The rule's last fit: ``final_fit_steps`` head steps on the whole replay at a fresh
    ``final_fit_lr``, best held-out weights kept. Online, each update's fit is short and its
    rate annealed toward zero, so the head leaves training under-fit on the rollouts it holds
    (measured: docs/update_rules.md, section 14). The held-out check runs every 50 steps or
    ``check_every``, whichever is more (a long fit needs fewer). Empty without steps or a
    replay."""
    replay = getattr(model.value_head, "replay", None)
    if not config.final_fit_steps or replay is None or not replay.count:
        return {}
    optimizer = torch.optim.AdamW(model.value_head.parameters(), lr=config.final_fit_lr,
                                  weight_decay=config.weight_decay)
    fit = dataclasses.replace(config, regression_steps=config.final_fit_steps,
                              check_every=max(config.check_every, 50))
    metrics = learner_step(model, optimizer, [], fit, torch.Generator().manual_seed(seed), seed)
    return {f"final_fit_{key}": value for key, value in metrics.items()}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on `device` (elsewhere it is emulated, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _replay(head, config: ValueConfig) -> Replay:
    """The replay on the value head; a new, empty one if its bounds are not the config's."""
    settings = (config.replay_rollouts, config.replay_bytes, config.heldout_every)
    if getattr(head, "replay", None) is None or head.replay.settings != settings:
        head.replay = Replay(config.replay_rollouts, config.heldout_every, config.replay_bytes)
    return head.replay


def learner_state(model) -> dict[str, torch.Tensor]:
    """What the learner keeps beyond the weights and optimizer: the replay, for a checkpoint."""
    replay = getattr(model.value_head, "replay", None)
    return {} if replay is None else replay.state_dict()


def restore_learner_state(model, config: ValueConfig, state: dict[str, torch.Tensor]) -> None:
    """Put back a checkpoint's replay (`learner_state`); nothing if it had none."""
    if state:
        _replay(model.value_head, config).load_state_dict(state)


def train_step(model, optimizer: torch.optim.Optimizer, reward_fn: RewardFn,
               inputs: RolloutInputs, config: ValueConfig,
               generator: torch.Generator | None = None,
               report: bool = False) -> dict[str, float]:
    """One in-process value update on a full batch; with ``report`` the policy is sampled too,
    for its reward and KL (metrics only: the update never reads them)."""
    payload, metrics = worker_step(model, reward_fn, inputs, config, inputs.batch_size, 0,
                                   report=report)
    generator = generator or torch.Generator().manual_seed(0)
    metrics.update(learner_step(model, optimizer, [payload], config, generator, 0))
    return metrics
