"""The analytic 2-D Gaussian mixture as a flow model: the exact velocity, no training needed.

Under the rectified flow x_s = (1 - s) x0 + s eps a mixture p_pre(x0) = sum_k w_k N(mu_k, Sigma_k)
stays a mixture, p_s = sum_k w_k N((1 - s) mu_k, C_k(s)) with C_k(s) = (1 - s)^2 Sigma_k + s^2 I,
and the optimal velocity is the posterior mean of eps - x0: within component k,
E[eps | x_s] = s C_k^-1 d_k and E[x0 | x_s] = mu_k + (1 - s) Sigma_k C_k^-1 d_k with
d_k = x_s - (1 - s) mu_k, weighted by the responsibilities. It is finite on all of [0, 1] (no
division by 1 - s), so the velocity-to-noise conversion of `FlowBackbone` is what is tested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ctrl_ray.models.flow import FlowBackbone
from ctrl_ray.models.gaussian_mixture import MixtureParameters, noised_components


class FlowGaussianMixtureBackbone(MixtureParameters, FlowBackbone):
    """p_pre = a 2-D Gaussian mixture as a flow: v = exact velocity + a zero-started correction.

    ``flow_sigmas`` (T,) are the noise levels s of the timestep indices (increasing, in (0, 1]).
    The residual MLP corrects the velocity by -sqrt(1 - abar) / (1 - s) times its output, read
    at the rescaled state x~ = x_s / r(s): eps then moves by -sqrt(1 - abar) times it, exactly
    as in `GaussianMixtureBackbone` on the same abar table (the form of the exact correction
    toward a posterior, well conditioned where the KL is steep). At s = 1 no velocity moves
    eps (eps = x_s there, for any flow model), so the factor is capped at 1 / machine epsilon.
    """

    def __init__(
        self,
        weights: Tensor | Sequence[float],
        means: Tensor | Sequence[Sequence[float]],
        covariances: Tensor | Sequence,
        flow_sigmas: Tensor,
        embedding_dim: int = 32,
        hidden_dim: int = 128,
        seed: int = 0,
    ):
        super().__init__()
        self.register_flow_sigmas(flow_sigmas)
        self.init_mixture(weights, means, covariances, len(self.flow_sigmas), embedding_dim,
                          hidden_dim, seed)

    def flow_marginal(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """Component means (B, K, 2) and covariances (B, K, 2, 2) of p_s at noise levels s (B,)."""
        keep = (1 - s)[:, None, None, None]
        noise = s[:, None, None, None]
        identity = torch.eye(2, device=s.device, dtype=s.dtype)
        return keep[..., 0] * self.means, keep**2 * self.covariances + noise**2 * identity

    def flow_log_prob_and_velocity(self, x_s: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """log p_s(x_s) (B,) and the exact velocity E[eps - x0 | x_s] (B, 2) at noise levels s."""
        means, covariances = self.flow_marginal(s)
        log_prob, responsibilities, precision_offsets = noised_components(
            x_s, self.weights.log(), means, covariances)
        noise_mean = s[:, None, None] * precision_offsets
        covariance_offsets = (self.covariances * precision_offsets[..., None, :]).sum(-1)
        clean_mean = self.means + (1 - s)[:, None, None] * covariance_offsets
        velocity = (responsibilities[..., None] * (noise_mean - clean_mean)).sum(1)
        return log_prob, velocity

    def predict_velocity(self, x_s: Tensor, t: Tensor, context: Tensor | None,
                         extra_embedding: Tensor | None = None) -> Tensor:
        s = self.flow_sigmas[t].to(x_s.dtype)
        _, velocity = self.flow_log_prob_and_velocity(x_s, s)
        radius = torch.hypot(1 - s, s)[:, None]
        gap = (1 - s).clamp_min(torch.finfo(x_s.dtype).eps)[:, None]
        correction = self.network(x_s / radius, t, extra_embedding)
        return velocity - (s[:, None] / radius) / gap * correction
