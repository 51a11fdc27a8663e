"""The soft value head: log h_t(x; y, c), whose gradient is the policy's control (adapter
``value`` of `AugmentedModel`; trained by `ctrl_ray.objectives.value`).

For the tilt lambda = gamma / kl_weight the optimum of CTRL's objective is the base chain
tilted by h_t(x; y, c) = E_pre[p(y | x0, c)^lambda | x_t = x, c]. The network outputs log h for
every target y (a tuple of classes, one per label) as log-softmax + log-mass,

    log h_t(x; y) = log q_t(y | x) + log m_t(x),

so that q can be fit by cross-entropy on the normalised targets p(y | x0)^lambda / m and m by
a Poisson loss on m = sum_y p(y | x0)^lambda: both then estimate exact conditional means, for
any lambda (`value_loss`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.adapter_config import check_step_candidates, check_step_scale
from ctrl_ray.models.classifier import conv_stages


@dataclass
class SoftValueSpec:
    """The head's input shape (any channels and size: pixels or latents), labels, contexts and
    widths (stored in the policy spec). Contexts are class indices (``num_contexts``) or, for a
    text backbone, a prompt's pooled embedding of width ``context_dim``, so any text works."""

    sample_shape: list[int]
    label_classes: dict[str, int]
    num_contexts: int | None = None
    context_dim: int | None = None
    channels: list[int] = field(default_factory=lambda: [16, 32])   # conv widths (images)
    hidden_dim: int = 128                                            # MLP width (vectors)
    time_embedding_dim: int = 64
    step_candidates: int = 8      # the step: 0 first-order, else this many base candidates
    step_scale: float = 1.0       # the step's multiple (> 1: a head early stopping left flat)
    target_power: float = 1.0     # fit p^(power lambda), steer by its log / power (< 1: less
                                  # variance from a rare target's few hits, a bias instead)
    initial_candidates: int = 32  # the tilt of x_T: 0 none, else this many base candidates
    coordinates: bool = True      # two channels of each pixel's position (images): where
                                  # things are survives the global average pool

    def __post_init__(self):
        self.channels = [int(width) for width in self.channels]
        if not self.channels or min(self.channels) < 1:
            raise InputError(f"value_head.channels: need positive widths, got {self.channels}")
        for key in ("hidden_dim", "time_embedding_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 2:
                raise InputError(f"value_head.{key}: need an integer >= 2, got "
                                 f"{getattr(self, key)!r}")
        if self.time_embedding_dim % 2:
            raise InputError(f"value_head.time_embedding_dim: need an even width, got "
                             f"{self.time_embedding_dim}")
        check_step_candidates(self.step_candidates)
        check_step_candidates(self.initial_candidates, "initial_candidates")
        check_step_scale(self.step_scale)
        check_step_scale(self.target_power, "target_power")
        if self.num_contexts and self.context_dim:
            raise InputError("a value head conditions on class indices or on prompt "
                             "embeddings, not both")

    @property
    def targets(self) -> list[tuple[int, ...]]:
        """Every target y: one class per label, in `itertools.product` order."""
        return list(itertools.product(*(range(k) for k in self.label_classes.values())))


class SoftValueNet(nn.Module):
    """log h_t(x; y, c) for every target y: conv stages (images) or an MLP (vectors), shifted
    after every block by an embedding of t and of the context c."""

    def __init__(self, spec: SoftValueSpec):
        super().__init__()
        self.spec = spec
        outputs = len(spec.targets) + 1   # the logits of q, then log m
        dim = spec.time_embedding_dim
        self.is_image = len(spec.sample_shape) == 3
        if self.is_image:
            in_channels = spec.sample_shape[0] + (2 if spec.coordinates else 0)
            self.blocks = conv_stages(in_channels, spec.channels)
            self.head = nn.Linear(spec.channels[-1], outputs)
            widths = [block[0].out_channels for block in self.blocks]
        else:
            inputs = math.prod(spec.sample_shape)
            self.blocks = nn.ModuleList([
                nn.Sequential(nn.Linear(inputs, spec.hidden_dim), nn.SiLU()),
                nn.Sequential(nn.Linear(spec.hidden_dim, spec.hidden_dim), nn.SiLU())])
            self.head = nn.Linear(spec.hidden_dim, outputs)
            widths = [spec.hidden_dim, spec.hidden_dim]
        # Zero-started output: h is constant, so the policy starts as the base model exactly.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.context_embedding = None
        if spec.num_contexts:
            # Zero-started: an N(0, 1) embedding swamps the timestep's and the head learns
            # nothing online (measured: the loss stays at the prior's).
            self.context_embedding = nn.Embedding(spec.num_contexts, dim)
            nn.init.zeros_(self.context_embedding.weight)
        self.context_projection = None
        if spec.context_dim:
            # A prompt's text embedding, zero-started for the same reason.
            self.context_projection = nn.Linear(spec.context_dim, dim)
            nn.init.zeros_(self.context_projection.weight)
            nn.init.zeros_(self.context_projection.bias)
        self.shifts = nn.ModuleList(nn.Linear(dim, width) for width in widths)

    def forward(self, x: Tensor, t: Tensor, contexts: Tensor | None) -> tuple[Tensor, Tensor]:
        """(log q (B, J) over the targets, log m (B,)) at states x (B, *shape), timesteps t;
        ``contexts`` are class indices (B,) or prompt embeddings (B, context_dim)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        embedding = get_timestep_embedding(t.float(), self.spec.time_embedding_dim)
        embedding = self.time_mlp(embedding.to(x.dtype))
        if self.context_embedding is not None:
            embedding = embedding + self.context_embedding(contexts.long())
        if self.context_projection is not None:
            embedding = embedding + self.context_projection(contexts.to(embedding.dtype))
        hidden = x if self.is_image else x.flatten(1)
        if self.is_image and self.spec.coordinates:
            hidden = torch.cat([hidden, _coordinate_channels(x)], dim=1)
        for block, shift in zip(self.blocks, self.shifts, strict=True):
            shift = shift(embedding)
            hidden = block(hidden) + (shift[:, :, None, None] if self.is_image else shift)
        if self.is_image:
            hidden = hidden.mean(dim=(2, 3))
        with torch.autocast(x.device.type, enabled=False):   # log h in fp32 under any autocast
            out = self.head(hidden.float())
        return F.log_softmax(out[:, :-1], dim=-1), out[:, -1]

    def is_flat(self) -> bool:
        """Whether log h is constant in x (the output layer's weights zero, as started; its
        bias only shifts log h): the policy is then the base model exactly."""
        return not self.head.weight.any()

    def log_value(self, x: Tensor, t: Tensor, contexts: Tensor | None,
                  labels: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(log h_t(x; y, c) of each row's own target (B,), whether the row is controlled (B,)).
        A null label (value K) is marginalised (log-sum-exp over its classes, exact for
        lambda = 1); a row whose labels are all null gets no control (it is the base model)."""
        names = list(self.spec.label_classes)
        targets = torch.tensor(self.spec.targets, device=x.device)           # (J, L)
        rows = torch.stack([labels[name].long() for name in names], 1)      # (B, L)
        null = rows == torch.tensor([self.spec.label_classes[n] for n in names],
                                    device=x.device)
        consistent = ((targets[None] == rows[:, None]) | null[:, None]).all(-1)   # (B, J)
        log_q, log_m = self(x, t, contexts)
        log_fitted = torch.logsumexp(log_q.masked_fill(~consistent, float("-inf")), 1) + log_m
        return log_fitted / self.spec.target_power, \
            ~null.all(1)

    def grad_log_value(self, x: Tensor, t: Tensor, contexts: Tensor | None,
                       labels: Mapping[str, Tensor]) -> Tensor:
        """grad_x log h_t(x; y, c) of each row's own target (detached; zero for a row with no
        control)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_value, active = self.log_value(x, t, contexts, labels)
            (gradient,) = torch.autograd.grad(log_value.sum(), x)
        return gradient * active.view(-1, *[1] * (x.dim() - 1)).to(gradient.dtype)

    def mean_shift(self, mean: Tensor, sigma: Tensor, t: Tensor, contexts: Tensor | None,
                   labels: Mapping[str, Tensor], offsets: Tensor | None) -> Tensor:
        """The shift of a reverse step's base mean toward the tilted step's,
        E[x' | x] - mean under N(x'; mean, sigma^2) h_t(x') / E[h_t].

        Without ``offsets``: the first-order step sigma^2 grad log h_t(mean), exact only where
        log h is linear over a ball of radius sigma. With ``offsets`` (K, B, *shape) of N(0, I)
        noise: sigma^2 E_tilted[grad log h_t(x')] (Stein's identity), estimated on the 2K base
        candidates x' = mean +- sigma offsets weighted by h_t(x'). The first-order step follows
        the head's gradient at one point, where an over-fit head's spurious high-frequency
        components cost KL for no control; the tilted mean averages them out (measured:
        docs/update_rules.md, section 8). Either is multiplied by ``step_scale``: a head fitted
        with early stopping is flatter than h (section 9)."""
        scale = self.spec.step_scale
        if offsets is None:
            return scale * sigma**2 * self.grad_log_value(mean, t, contexts, labels)
        candidates = len(offsets) * 2
        noise = torch.cat([offsets, -offsets]).to(mean)            # antithetic: mean exactly
        x = (mean[None] + sigma * noise).flatten(0, 1)

        def repeat(value: Tensor | None) -> Tensor | None:
            return None if value is None else value.repeat(candidates, *[1] * (value.dim() - 1))

        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_value, active = self.log_value(x, t, repeat(contexts),
                                               {name: repeat(v) for name, v in labels.items()})
            (gradient,) = torch.autograd.grad(log_value.sum(), x)
        weights = torch.softmax(log_value.detach().view(candidates, -1), 0)
        shape = (candidates, *mean.shape)
        tilted = (weights.view(*weights.shape, *[1] * (mean.dim() - 1)) *
                  gradient.view(shape)).sum(0)
        active = active.view(candidates, -1)[0]
        return scale * sigma**2 * tilted * active.view(-1, *[1] * (mean.dim() - 1)).to(
            tilted.dtype)


def _coordinate_channels(x: Tensor) -> Tensor:
    """(B, 2, H, W): each pixel's row and column, scaled to [-1, 1] (CoordConv)."""
    height, width = x.shape[-2:]
    rows = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
    cols = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.expand(x.shape[0], -1, -1, -1)


def value_loss(network: SoftValueNet, x: Tensor, t: Tensor, contexts: Tensor | None,
               log_targets: Tensor) -> Tensor:
    """Mean over rows of m * cross-entropy(s, q) + Poisson(m, log m), where the targets are
    log_targets (B, J) = lambda log p(y | x0) for every y: minimised by q = E[m s] / E[m] and
    m = E[m] given (x, t, c), i.e. by log h."""
    return predicted_value_loss(*network(x, t, contexts), log_targets)


def predicted_value_loss(log_q: Tensor, log_m: Tensor, log_targets: Tensor) -> Tensor:
    """`value_loss` of given predictions: log q (B, J) over the targets and log m (B,)."""
    log_mass = torch.logsumexp(log_targets, dim=1)
    normalised, mass = (log_targets - log_mass[:, None]).exp(), log_mass.exp()
    cross_entropy = -(normalised * log_q).sum(1)
    return (mass * cross_entropy + log_m.exp() - mass * log_m).mean()
