"""Reverse diffusion that records a trajectory: DDIM with eta, DDPM ancestral, per-step KL.

Each reverse step is Gaussian, x_{t-1} ~ N(mu(x_t), sigma_t^2 I), with the DDIM mean

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)             (optionally clipped to [-1, 1])
    eps    = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)           (re-derived from the clipped x0_hat)
    mu     = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)

where a = alphas_cumprod. With eta = 1, sigma_t^2 is the DDPM posterior variance beta_tilde and
mu is the DDPM posterior mean of q(x_{t-1} | x_t, x0_hat): DDIM with eta = 1 *is* DDPM
ancestral sampling on the strided grid, so ``method="ddpm"`` is that. Timesteps are
diffusers' "leading" grid with ``steps_offset=1`` (981, 961, ..., 1 for T = 1000, S = 50, as
DDPO / Stable Diffusion): starting below t = T - 1 avoids the step where alphas_cumprod ~ 0
makes x0_hat, hence the mean, blow up any change of eps (~1e3x for a cosine schedule). The
last step goes from t = 1 to a_prev = alphas_cumprod[0] (diffusers' ``set_alpha_to_one=False``),
not to 1, so sigma_t > 0 on every step and the per-step KL is finite.

Policy and reference share sigma_t, so the KL of a step is closed-form:
KL_t = || mu_policy - mu_reference ||^2 / (2 sigma_t^2), summed (nats) or averaged over the
non-batch dimensions (``kl_reduction``). All randomness comes in through ``RolloutInputs``
(labels, contexts, initial and per-step noise), so a batch split across workers gives exactly
the result of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.sampler_config import KL_REDUCTIONS, Truncation


@dataclass
class DenoisingSchedule:
    """The S strided reverse steps: timesteps t, a_t, a_prev and sigma_t, each of shape (S,)."""

    timesteps: Tensor
    alphas: Tensor
    alphas_prev: Tensor
    sigmas: Tensor

    @classmethod
    def create(cls, alphas_cumprod: Tensor, num_steps: int, eta: float) -> DenoisingSchedule:
        num_train_timesteps = len(alphas_cumprod)
        if not 1 <= num_steps < num_train_timesteps:
            raise InputError(
                f"num_inference_steps must be in 1..{num_train_timesteps - 1}, got {num_steps}"
            )
        if eta < 0:
            raise InputError(f"eta must be >= 0, got {eta}")
        ratio = num_train_timesteps // num_steps
        timesteps = (torch.arange(num_steps - 1, -1, -1) * ratio + 1).to(alphas_cumprod.device)
        cumulative = alphas_cumprod.double()
        alphas = cumulative[timesteps]
        alphas_prev = torch.cat([alphas[1:], cumulative[:1]])
        sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
        dtype = alphas_cumprod.dtype
        return cls(timesteps, alphas.to(dtype), alphas_prev.to(dtype), sigmas.to(dtype))

    def denoised(self, step: int, x_t: Tensor, noise_prediction: Tensor,
                 clip_sample: bool) -> Tensor:
        """x0_hat(x_t) at ``step`` (0-based) from a noise prediction, clipped if asked."""
        alpha = self.alphas[step]
        x0_hat = (x_t - (1 - alpha).sqrt() * noise_prediction) / alpha.sqrt()
        return x0_hat.clamp(-1.0, 1.0) if clip_sample else x0_hat

    def mean(self, step: int, x_t: Tensor, noise_prediction: Tensor, clip_sample: bool) -> Tensor:
        """The reverse-step mean mu(x_t) at ``step`` (0-based) from a noise prediction."""
        alpha, alpha_prev, sigma = self.alphas[step], self.alphas_prev[step], self.sigmas[step]
        x0_hat = self.denoised(step, x_t, noise_prediction, clip_sample)
        if clip_sample:
            noise_prediction = (x_t - alpha.sqrt() * x0_hat) / (1 - alpha).sqrt()
        direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * noise_prediction
        return alpha_prev.sqrt() * x0_hat + direction


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """log N(x; mean, sigma^2 I) summed over the non-batch dimensions, shape (B,)."""
    dims = x[0].numel()
    squared = ((x - mean) ** 2).flatten(1).sum(1)
    return -squared / (2 * sigma**2) - dims * (sigma.log() + 0.5 * math.log(2 * math.pi))


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, sigma: Tensor, reduction: str = "sum") -> Tensor:
    """KL(N(mean_p, sigma^2 I) || N(mean_q, sigma^2 I)) per sample (B,), summed or averaged."""
    per_dim = ((mean_p - mean_q) ** 2).flatten(1) / (2 * sigma**2)
    return per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)


def _check_distribution(name: str, probabilities: Sequence[float], size: int) -> Tensor:
    probs = torch.as_tensor(probabilities, dtype=torch.float64)
    if probs.shape != (size,) or torch.any(probs < 0) or not probs.sum() > 0:
        raise InputError(
            f"{name} must be {size} non-negative probabilities, got {list(probabilities)}"
        )
    return probs / probs.sum()


@dataclass
class RolloutInputs:
    """All randomness of one batch, drawn once so any split of the batch reproduces it exactly.

    labels: name -> (B,) long (value K = null); contexts: (B,) long class ids, other conditioning
    with batch first, or None; initial_noise: (B, *shape) = x_T; step_noise: (S, B, *shape);
    gradient_steps: the truncation window drawn with the batch (None = all steps);
    candidate_seeds: (B,) int64, each row's seed for the value head's step candidates
    (`candidate_noise`; by default taken from the bits of the row's x_T, so a row keeps its
    candidates alone or in any batch).
    """

    labels: dict[str, Tensor]
    contexts: Tensor | None
    initial_noise: Tensor
    step_noise: Tensor
    gradient_steps: int | None = None
    candidate_seeds: Tensor | None = None

    def __post_init__(self):
        if self.candidate_seeds is None:
            bits = self.initial_noise.detach().flatten(1)[:, :2].float().cpu().contiguous()
            words = bits.view(torch.int32).long() & 0xFFFFFFFF
            self.candidate_seeds = words[:, 0] * 2**31 + words[:, -1]

    def candidate_noise(self, step: int, count: int) -> Tensor:
        """(count, B, *shape) N(0, I) noise for step `step`'s candidates, row by row from the
        row's seed (on CPU, float32)."""
        shape = tuple(self.initial_noise.shape[1:])
        return torch.stack([
            torch.randn((count, *shape), generator=torch.Generator().manual_seed(
                (int(seed) * 1_000_003 + step) % 2**63))
            for seed in self.candidate_seeds.tolist()], 1)

    @property
    def batch_size(self) -> int:
        return self.initial_noise.shape[0]

    @property
    def num_steps(self) -> int:
        return self.step_noise.shape[0]

    @classmethod
    def draw(
        cls,
        generator: torch.Generator | int,
        batch_size: int,
        num_steps: int,
        sample_shape: Sequence[int],
        label_classes: Mapping[str, int],
        label_distribution: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
        num_contexts: int | None = None,
        context_distribution: Sequence[float] | None = None,
        truncation: Truncation | None = None,
        rows: tuple[int, int] | None = None,
    ) -> RolloutInputs:
        """Draw labels, contexts, the noise seed and the truncation window (on CPU, in that
        order), then the noise of each row from its own generator.

        ``label_distribution``: None (uniform over the K classes), one list of K probabilities
        for every label, or a dict name -> list. ``num_contexts=None`` means no contexts.
        ``rows=(start, stop)``: only those rows of the batch, equal to slicing the whole draw,
        at the cost of those rows (a rollout worker draws its own shard from the batch's seed).
        """
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        labels = {}
        for name, num_classes in label_classes.items():
            probs = label_distribution
            if isinstance(label_distribution, Mapping):
                probs = label_distribution.get(name)
            probs = [1.0] * num_classes if probs is None else probs
            probs = _check_distribution(f"label_distribution[{name!r}]", probs, num_classes)
            labels[name] = torch.multinomial(probs, batch_size, True, generator=generator)
        contexts = None
        if num_contexts is not None:
            probs = [1.0] * num_contexts if context_distribution is None else context_distribution
            probs = _check_distribution("context_distribution", probs, num_contexts)
            contexts = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        noise_seed = int(torch.randint(0, 2**62, (), generator=generator))
        window = truncation.gradient_steps(num_steps, generator) if truncation else None
        start, stop = rows if rows is not None else (0, batch_size)
        initial_noise, step_noise = _row_noise(noise_seed, range(start, stop), num_steps,
                                               tuple(sample_shape))
        return cls({name: values[start:stop] for name, values in labels.items()},
                   None if contexts is None else contexts[start:stop], initial_noise,
                   step_noise, window)

    def slice(self, start: int, stop: int) -> RolloutInputs:
        """Rows start:stop of the batch (the same truncation window)."""
        return RolloutInputs(
            labels={name: values[start:stop] for name, values in self.labels.items()},
            contexts=None if self.contexts is None else self.contexts[start:stop],
            initial_noise=self.initial_noise[start:stop],
            step_noise=self.step_noise[:, start:stop],
            gradient_steps=self.gradient_steps,
            candidate_seeds=self.candidate_seeds[start:stop],
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RolloutInputs:
        """Move to ``device``; ``dtype`` applies to the noise and to floating-point contexts."""
        contexts = self.contexts
        if contexts is not None:
            floating = contexts.is_floating_point() and dtype is not None
            contexts = contexts.to(device, dtype) if floating else contexts.to(device)
        return RolloutInputs(
            labels={name: values.to(device) for name, values in self.labels.items()},
            contexts=contexts,
            initial_noise=self.initial_noise.to(device, dtype),
            step_noise=self.step_noise.to(device, dtype),
            gradient_steps=self.gradient_steps,
            candidate_seeds=self.candidate_seeds,
        )


def _row_noise(seed: int, rows: range, num_steps: int, shape: tuple[int, ...]
               ) -> tuple[Tensor, Tensor]:
    """x_T (n, *shape) and the step noise (S, n, *shape) of ``rows``, each row from its own
    generator seeded by (``seed``, row)."""
    initial, steps = [], []
    for row in rows:
        generator = torch.Generator().manual_seed((seed + row * 0x9E3779B97F4A7C15) % 2**63)
        initial.append(torch.randn(shape, generator=generator))
        steps.append(torch.randn((num_steps, *shape), generator=generator))
    if not initial:
        return torch.empty((0, *shape)), torch.empty((num_steps, 0, *shape))
    return torch.stack(initial), torch.stack(steps, 1)


@dataclass
class Trajectory:
    """One batch of reverse trajectories (S steps, B samples).

    states (S+1, B, ...) x_T .. x_0 and means (S, B, ...) are detached; log_probs (S, B) is
    log N(x_{t-1}; mu_policy, sigma_t^2) (None when eta = 0); kl (S, B) is the per-step KL to the
    reference (None when not computed) and, like x0, carries gradients inside the window;
    log_ratio (S, B), detached, is log q/p_ref of each step's draw (only when asked for): its
    path sum importance-weights a policy sample to the reference.
    """

    states: Tensor
    means: Tensor
    log_probs: Tensor | None
    kl: Tensor | None
    sigmas: Tensor
    timesteps: Tensor
    x0: Tensor
    labels: dict[str, Tensor] = field(default_factory=dict)
    contexts: Tensor | None = None
    log_ratio: Tensor | None = None

    @property
    def path_kl(self) -> Tensor:
        """KL(P_policy || P_reference) of each path, sum_t KL_t, shape (B,)."""
        if self.kl is None:
            raise InputError("the trajectory has no KL: sample it with compute_kl=True")
        return self.kl.sum(0)

    @property
    def path_log_ratio(self) -> Tensor:
        """log P_policy(path) / P_reference(path) of each sampled path, shape (B,): its mean
        over paths is the path KL."""
        if self.log_ratio is None:
            raise InputError("the trajectory has no log ratio: sample it with "
                             "compute_log_ratio=True")
        return self.log_ratio.sum(0)


NoiseFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # (x_t, t, contexts) -> eps


def step_mean(
    schedule: DenoisingSchedule,
    step: int,
    noise_fn: NoiseFn,
    x_t: Tensor,
    contexts: Tensor | None,
    clip_sample: bool,
    checkpoint: bool = False,
) -> Tensor:
    """mu(x_t) of reverse step ``step`` under a noise predictor (e.g. to recompute PPO ratios).

    With ``checkpoint`` the network's activations are recomputed in backward, not stored.
    """
    t = schedule.timesteps[step].expand(x_t.shape[0])

    def mean(x: Tensor) -> Tensor:
        return schedule.mean(step, x, noise_fn(x, t, contexts), clip_sample)

    return activation_checkpoint(mean, x_t, use_reentrant=False) if checkpoint else mean(x_t)


def sample(
    model: AugmentedModel,
    inputs: RolloutInputs,
    *,
    eta: float = 1.0,
    method: str = "ddim",
    clip_sample: bool | None = None,
    compute_kl: bool = True,
    kl_reduction: str = "sum",
    differentiable: bool = False,
    gradient_steps: int | None = None,
    checkpoint: bool = True,
    from_reference: bool = False,
    compute_log_ratio: bool = False,
) -> Trajectory:
    """Run the reverse process from ``inputs`` with the policy (or the reference) and record it.

    differentiable=False: everything under ``torch.no_grad()`` (rollouts, evaluation).
    differentiable=True: only the last ``gradient_steps`` steps with t >= model.min_timestep
    (default: inputs.gradient_steps, else all), and the gated steps after them, call the
    networks with gradients; earlier steps run under ``no_grad``, so they
    contribute no parameter gradient (their x_t does not depend on the parameters). Inside the
    window the reference mean is differentiable in x_t too (its weights are frozen), since x_t
    depends on the parameters and the KL gradient needs that path; with ``checkpoint`` each
    network call is recomputed in backward instead of storing its activations.
    ``compute_kl=False`` skips the reference network entirely; ``from_reference=True`` samples
    the pre-trained model (KL is then zero and not computed). ``compute_log_ratio`` (with the
    KL) also records each step's log q/p_ref of the draw, for importance weighting.
    """
    if method not in ("ddim", "ddpm"):
        raise InputError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    if method == "ddpm" and eta != 1.0:
        raise InputError(f"method 'ddpm' is DDIM with eta = 1; got eta = {eta}")
    if kl_reduction not in KL_REDUCTIONS:
        raise InputError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
    compute_kl = compute_kl and not from_reference
    if compute_kl and eta == 0:
        raise InputError("compute_kl needs eta > 0 (the KL of deterministic steps is undefined)")
    inputs = inputs.to(model.alphas_cumprod.device, model.alphas_cumprod.dtype)
    model.validate_labels(inputs.labels, inputs.batch_size)
    clip_sample = model.clip_sample if clip_sample is None else clip_sample
    schedule = DenoisingSchedule.create(model.alphas_cumprod, inputs.num_steps, eta)
    num_steps = inputs.num_steps
    window = gradient_steps or inputs.gradient_steps or num_steps
    # Below the model's min_timestep the policy is the pre-trained network: those steps have
    # no parameters (the truncation window does not count them) and no KL.
    min_timestep = getattr(model, "min_timestep", 0)
    adapted = [step for step in range(num_steps) if schedule.timesteps[step] >= min_timestep]
    first_gradient_step = num_steps
    if differentiable:
        if not adapted:
            raise InputError(f"min_timestep {min_timestep} leaves no step of the {num_steps}-step "
                             f"sampler to train (largest timestep {int(schedule.timesteps[0])})")
        first_gradient_step = adapted[-min(window, len(adapted))]

    if from_reference:
        policy_noise = model.reference_noise
    else:
        policy_noise = partial(model.predict_noise, labels=inputs.labels)

    # A value head (`AugmentedModel.mean_shift`) keeps the base network and shifts its mean.
    mean_shift = None if from_reference else getattr(model, "mean_shift", None)
    candidates = getattr(model, "step_candidates", 0) // 2 if mean_shift is not None else 0
    next_timesteps = torch.cat([schedule.timesteps[1:], schedule.timesteps.new_zeros(1)])
    x = inputs.initial_noise
    initial_kl = initial_log_ratio = None
    initial = getattr(model, "initial_candidates", 0) // 2 if mean_shift is not None else 0
    if initial and 0 in adapted:
        # The value head's tilt of x_T, a Gaussian shift of N(0, I): its KL joins step 1's.
        shift = model.initial_shift(x, schedule.timesteps[0], inputs.contexts, inputs.labels,
                                    inputs.candidate_noise(-1, initial))
        if shift is not None:
            x = x + shift
            if compute_kl:
                initial_kl = gaussian_kl(shift, torch.zeros_like(shift), torch.ones_like(
                    schedule.sigmas[0]), kl_reduction)
                initial_log_ratio = ((x**2 - (x - shift) ** 2).flatten(1).sum(1) / 2).detach()
    states, means, log_probs, kls, log_ratios = [x], [], [], [], []
    for step in range(num_steps):
        sigma = schedule.sigmas[step]
        in_window = step >= first_gradient_step
        with torch.set_grad_enabled(in_window):
            mean = step_mean(schedule, step, policy_noise, x, inputs.contexts, clip_sample,
                             checkpoint=in_window and checkpoint)
            shift = None if mean_shift is None or step not in adapted else mean_shift(
                mean, sigma, schedule.timesteps[step], next_timesteps[step], inputs.contexts,
                inputs.labels, inputs.candidate_noise(step, candidates) if candidates else None)
            if compute_kl:
                if shift is not None or step not in adapted:
                    mean_reference = mean   # the policy's network is the base's here
                else:
                    mean_reference = step_mean(
                        schedule, step, model.reference_noise, x, inputs.contexts, clip_sample,
                        checkpoint=in_window and checkpoint)
            if shift is not None:
                mean = mean + shift
            if compute_kl:
                kls.append(gaussian_kl(mean, mean_reference, sigma, kl_reduction))
            x = mean + sigma * inputs.step_noise[step]
            if compute_kl and compute_log_ratio:
                with torch.no_grad():
                    log_ratios.append((((x - mean_reference) ** 2 - (x - mean) ** 2).flatten(1)
                                       .sum(1) / (2 * sigma**2)).detach())
        if eta > 0:
            log_probs.append(gaussian_log_prob(x.detach(), mean.detach(), sigma))
        means.append(mean.detach())
        states.append(x.detach())

    if initial_kl is not None:
        kls[0] = kls[0] + initial_kl
        if log_ratios:
            log_ratios[0] = log_ratios[0] + initial_log_ratio
    return Trajectory(
        states=torch.stack(states),
        means=torch.stack(means),
        log_probs=torch.stack(log_probs) if log_probs else None,
        kl=torch.stack(kls) if kls else None,
        sigmas=schedule.sigmas,
        timesteps=schedule.timesteps,
        x0=x,
        labels=inputs.labels,
        contexts=inputs.contexts,
        log_ratio=torch.stack(log_ratios) if log_ratios else None,
    )
