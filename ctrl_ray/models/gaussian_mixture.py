"""An analytic 2-D Gaussian-mixture backbone: the exact noised score, no training needed.

Under the forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, a mixture
p_pre(x0) = sum_k w_k N(mu_k, Sigma_k) stays a mixture,
p_t(x_t) = sum_k w_k N(sqrt(a_t) mu_k, a_t Sigma_k + (1 - a_t) I),
and the optimal noise prediction is eps(x_t) = -sqrt(1 - a_t) grad log p_t(x_t).
This gives a p_pre whose samples and density are known exactly, which is what the
correctness tests of CTRL need (the posterior p_pre(x) p(y | x) can be computed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctrl_ray.errors import InputError
from ctrl_ray.models.backbone import Backbone


def sinusoidal_features(t: Tensor, dim: int, num_train_timesteps: int) -> Tensor:
    """Sinusoidal features (B, dim) of integer timesteps, scaled to [0, 1) first."""
    half = dim // 2
    frequencies = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))
    angles = (t.float() / num_train_timesteps)[:, None] * frequencies[None, :] * 2 * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResidualScoreMLP(nn.Module):
    """A small MLP over (x_t, timestep embedding + extra embedding) that starts at exactly zero.

    Its output layer is zero-initialised, so the mixture backbone equals the analytic
    mixture until CTRL adapts this MLP (LoRA on its linear layers, or full fine-tuning).
    The hidden layers are random and frozen in the pre-trained model; only the adapted
    model ever has a non-zero MLP output.
    """

    def __init__(
        self, data_dim: int, embedding_dim: int, hidden_dim: int, num_train_timesteps: int
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_train_timesteps = num_train_timesteps
        self.time_embedding = nn.Sequential(
            nn.Linear(embedding_dim, embedding_dim),
            nn.SiLU(),
            nn.Linear(embedding_dim, embedding_dim),
        )
        self.input_layer = nn.Linear(data_dim + embedding_dim, hidden_dim)
        self.hidden_layer = nn.Linear(hidden_dim, hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, data_dim)
        nn.init.zeros_(self.output_layer.weight)
        nn.init.zeros_(self.output_layer.bias)

    def forward(self, x_t: Tensor, t: Tensor, extra_embedding: Tensor | None) -> Tensor:
        features = sinusoidal_features(t, self.embedding_dim, self.num_train_timesteps)
        features = features.to(x_t.dtype)
        embedding = self.time_embedding(features)
        if extra_embedding is not None:
            embedding = embedding + extra_embedding
        hidden = nn.functional.silu(self.input_layer(torch.cat([x_t, embedding], dim=-1)))
        hidden = nn.functional.silu(self.hidden_layer(hidden))
        return self.output_layer(hidden)


def noised_components(x: Tensor, log_weights: Tensor, means: Tensor,
                      covariances: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For points x (B, 2) under a mixture with per-row component means (B, K, 2) and
    covariances (B, K, 2, 2): log p(x) (B,), the responsibilities (B, K) and the precision-
    weighted offsets C_k^-1 (x - m_k) (B, K, 2), from which its score and posteriors follow.
    The 2 x 2 inverse is written out: a batched LAPACK solve of tiny matrices is ~7x slower."""
    offsets = x[:, None, :] - means  # (B, K, 2)
    a, b = covariances[..., 0, 0], covariances[..., 0, 1]
    c, d = covariances[..., 1, 0], covariances[..., 1, 1]
    determinant = a * d - b * c  # (B, K)
    precision_offsets = torch.stack([d * offsets[..., 0] - b * offsets[..., 1],
                                     a * offsets[..., 1] - c * offsets[..., 0]], dim=-1)
    precision_offsets = precision_offsets / determinant[..., None]  # (B, K, 2)
    log_components = (
        log_weights
        - 0.5 * (offsets * precision_offsets).sum(-1)
        - 0.5 * determinant.log()
        - math.log(2 * math.pi)
    )  # (B, K)
    responsibilities = torch.softmax(log_components, dim=1)
    return torch.logsumexp(log_components, dim=1), responsibilities, precision_offsets


class MixtureParameters:
    """Mixin for a 2-D Gaussian-mixture backbone: the mixture as buffers, its exact density and
    samples, and the zero-started `ResidualScoreMLP` that adapters act on (``network``). It is
    unconditional: ``num_contexts`` is None and ``clip_sample`` False."""

    def init_mixture(self, weights: Tensor | Sequence[float],
                     means: Tensor | Sequence[Sequence[float]], covariances: Tensor | Sequence,
                     num_train_timesteps: int, embedding_dim: int, hidden_dim: int,
                     seed: int) -> None:
        """Check and register the mixture, then build the residual network (seeded)."""
        weights, means, covariances = (torch.as_tensor(v, dtype=torch.float32)
                                       for v in (weights, means, covariances))
        num_components = weights.shape[0]
        if weights.ndim != 1 or torch.any(weights <= 0):
            raise InputError(f"weights must be a 1-D tensor of positive numbers, got {weights}")
        if means.shape != (num_components, 2):
            raise InputError(
                f"means must have shape ({num_components}, 2), got {tuple(means.shape)}"
            )
        if covariances.shape != (num_components, 2, 2):
            shape = tuple(covariances.shape)
            raise InputError(f"covariances must have shape ({num_components}, 2, 2), got {shape}")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("covariances", covariances)
        self.sample_shape = (2,)
        self.embedding_dim = embedding_dim
        self.clip_sample = False
        self.num_contexts = None
        self.default_lora_targets = ["input_layer", "hidden_layer", "output_layer"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = ResidualScoreMLP(2, embedding_dim, hidden_dim, num_train_timesteps)
        network.requires_grad_(False)
        self.network = network

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p_pre(x) (B,) of clean points x (B, 2)."""
        components = torch.distributions.MultivariateNormal(self.means, self.covariances)
        return torch.logsumexp(self.weights.log() + components.log_prob(x[:, None, :]), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples (n, 2) of p_pre(x0)."""
        device = self.means.device
        component = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        standard = torch.randn(n, 2, generator=generator, dtype=self.means.dtype)
        factors = torch.linalg.cholesky(self.covariances.cpu())
        x = self.means.cpu()[component] + (factors[component] @ standard[..., None])[..., 0]
        return x.to(device)


class GaussianMixtureBackbone(MixtureParameters, Backbone):
    """p_pre = a 2-D Gaussian mixture: eps = -sqrt(1 - a_t) (exact score + zero-started MLP).

    ``weights`` (K,), ``means`` (K, 2), ``covariances`` (K, 2, 2), ``alphas_cumprod`` (T,).
    ``network`` (what adapters act on) is the ``ResidualScoreMLP``; its output corrects the
    score, so eps moves by sqrt(1 - a_t) times it. That is the form the exact correction to
    a posterior takes (-sqrt(1 - a_t) grad log E[p(y | x0) | x_t]) and keeps small-t steps,
    where the KL penalises eps changes hardest, well conditioned.
    """

    def __init__(
        self,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence[Sequence[float]],
        covariances: Tensor | Sequence,
        alphas_cumprod: Tensor,
        embedding_dim: int = 32,
        hidden_dim: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod).float().clone(),
                             persistent=False)
        self.init_mixture(weights, means, covariances, len(self.alphas_cumprod), embedding_dim,
                          hidden_dim, seed)

    def noised_log_prob_and_score(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """log p_t(x_t) (B,) and grad log p_t(x_t) (B, 2) of the noised mixture, in closed form."""
        alpha = self.alphas_cumprod[t][:, None, None, None]  # (B, 1, 1, 1)
        means = alpha[..., 0].sqrt() * self.means  # (B, K, 2)
        identity = torch.eye(2, device=x_t.device)
        covariances = alpha * self.covariances + (1 - alpha) * identity  # (B, K, 2, 2)
        log_prob, responsibilities, precision_offsets = noised_components(
            x_t, self.weights.log(), means, covariances)
        return log_prob, -(responsibilities[..., None] * precision_offsets).sum(1)

    def predict_noise(
        self, x_t: Tensor, t: Tensor, context: Tensor | None, extra_embedding: Tensor | None = None
    ) -> Tensor:
        _, score = self.noised_log_prob_and_score(x_t, t)
        score = score + self.network(x_t, t, extra_embedding)
        return -(1 - self.alphas_cumprod[t])[:, None].sqrt() * score
