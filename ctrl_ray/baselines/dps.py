"""DPS / reconstruction guidance: CTRL's clean reward classifier, applied to the Tweedie estimate.

At every reverse step the frozen pre-trained model gives eps and the posterior-mean estimate
x0_hat(x_t) = (x_t - sqrt(1 - a_t) eps(x_t)) / sqrt(a_t); the gradient of the reward
log p(y | x0_hat(x_t)[, c]) with respect to x_t, back-propagated *through the network* (as in
DPS, Chung et al. 2023), is added to the score with a constant step size s:

    eps_guided = eps - s * sqrt(1 - a_t) * grad_{x_t} log p(y | x0_hat(x_t))

i.e. the score-correction form of reconstruction guidance (Ho et al. 2022), the same way
classifier guidance adds grad log p(y | x_t, t). The DPS paper instead shifts x_{t-1} by
zeta_t * grad after the unguided step; changing eps shifts the step mean along the same
gradient by s times a positive step-dependent factor, so the two differ only in the step-size
schedule (ignoring x0 clipping), and the score form keeps each reverse step Gaussian with the
sampler's sigma_t, so the per-step KL to the base model stays closed-form.
x0_hat is not clipped before the classifier (clipping would zero the gradient of saturated
pixels); the sampler still clips it in the mean as usual. For a latent (text-to-image) model
the reward reads the VAE decode of x0_hat at its own size and channels, as in CTRL's reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ctrl_ray.baselines import GuidedModel
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.reward import Reward
from ctrl_ray.models.text_to_image import decode_images


class DPSModel(GuidedModel):
    """The frozen pre-trained model steered by the reward's gradient at x0_hat(x_t)."""

    def __init__(self, model: AugmentedModel, reward: Reward, guidance_scale: float):
        super().__init__(model, reward.num_classes, guidance_scale)
        self.reward = reward.to(model.alphas_cumprod.device)
        self.weights = dict(zip(reward.label_names, reward.weights, strict=True))

    def guided_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                     labels: dict[str, Tensor]) -> Tensor:
        active = self.active_labels(labels)
        if not active or self.guidance_scale == 0:
            eps = self.model.reference_noise(x_t, t, context)
            self.remember_reference(x_t, t, context, eps)
            return eps
        root_alpha, sigma = self.noise_level(t, x_t)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            eps = self.model.reference_noise(x, t, context)
            x0_hat = (x - sigma * eps) / root_alpha
            images = decode_images(self.model.backbone, x0_hat)
            targets = {name: target for name, (target, _) in active.items()}
            log_p = self.reward.term_log_likelihoods(images, targets, context)
            total = sum(self.weights[name] * (log_p[name] * active[name][1]).sum()
                        for name in log_p)
            (gradient,) = torch.autograd.grad(total, x)
        eps = eps.detach()
        self.remember_reference(x_t, t, context, eps)
        return eps - self.guidance_scale * sigma * gradient
