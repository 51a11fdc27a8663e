"""The baselines of DESIGN section 4 on the same base model, pairs and sampler: CFG, CG, DPS.

Each baseline is a `GuidedModel`: an object with the interface `ctrl_ray.sampling.sampler.sample`
reads (``predict_noise``, ``reference_noise``, ``label_classes``, ``alphas_cumprod``, ...) whose
``predict_noise`` returns a *guided* noise prediction. The reverse step
(`DenoisingSchedule.mean`), the noise, the evaluation protocol (`ctrl_ray.evaluation.evaluate`)
and the per-step KL to the pre-trained model, ||mu_guided - mu_pre||^2 / (2 sigma_t^2), are the
sampler's own, so every number is comparable with CTRL's.

- `cfg.CFGModel`: eps_u + w (eps_c - eps_u) from one network trained on triplets with label dropout.
- `classifier_guidance.ClassifierGuidedModel`: eps - s sqrt(1 - a_t) grad log p(y | x_t, t).
- `dps.DPSModel`: eps - s sqrt(1 - a_t) grad_{x_t} log p(y | x0_hat(x_t)) (reconstruction guidance).
- `run.run_baseline(kind, config)`: train (or load), evaluate, log to MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ctrl_ray.models.augmented import AugmentedModel


class GuidedModel:
    """A sampler-compatible wrapper around an `AugmentedModel` whose noise prediction is guided.

    ``model.reference_noise`` is the pre-trained model (adapters off, labels bypassed): it is
    both what guidance starts from (CG, DPS) and what the sampler's KL is measured against.
    ``label_classes`` are the labels the guidance targets; the value K of a label is null and
    switches its guidance off for that row. Subclasses implement ``guided_noise``.
    """

    def __init__(self, model: AugmentedModel, label_classes: Mapping[str, int],
                 guidance_scale: float):
        self.model = model
        self.label_classes = dict(label_classes)
        self.guidance_scale = float(guidance_scale)
        self._cached: tuple[Tensor, Tensor, Tensor | None, Tensor] | None = None

    # -- what the sampler reads ------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> Tensor:
        return self.model.alphas_cumprod

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.model.sample_shape

    @property
    def clip_sample(self) -> bool:
        return self.model.clip_sample

    @property
    def num_contexts(self) -> int | None:
        return self.model.num_contexts

    def decode(self, samples: Tensor) -> Tensor:
        """Images from samples: the backbone's own decode (a latent model's VAE), as for CTRL."""
        return self.model.decode(samples)

    def validate_labels(self, labels: Mapping[str, Tensor], batch_size: int) -> None:
        # The check only reads self.label_classes, so AugmentedModel's own applies as is.
        AugmentedModel.validate_labels(self, labels, batch_size)

    def predict_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                      labels: Mapping[str, Tensor] | None = None) -> Tensor:
        """The guided noise prediction (detached: guidance is a sampler, not a policy)."""
        self._cached = None
        return self.guided_noise(x_t, t, context, dict(labels or {})).detach()

    def reference_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """The pre-trained model's noise prediction. The sampler asks for it right after the
        guided one at the same (x_t, t, context); CG and DPS computed it already then
        (`remember_reference`), so the KL costs no second network call."""
        if self._cached is not None:
            cached_x, cached_t, cached_context, eps = self._cached
            self._cached = None
            if cached_x is x_t and cached_context is context and torch.equal(cached_t, t):
                return eps
        return self.model.reference_noise(x_t, t, context)

    def remember_reference(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                           eps: Tensor) -> None:
        """Keep the pre-trained eps computed at this very ``x_t`` for `reference_noise`."""
        self._cached = (x_t, t, context, eps.detach())

    def guided_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                     labels: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- helpers for the subclasses ----------------------------------------------------------
    def noise_level(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(a_t) and sqrt(1 - a_t), shaped (B, 1, ..., 1) to broadcast against ``like``."""
        alpha = self.alphas_cumprod[t.long()].to(like.dtype)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.sqrt().view(shape), (1 - alpha).sqrt().view(shape)

    def active_labels(self, labels: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (labels with null replaced by 0, float mask of the rows that are not null)."""
        active = {}
        for name, values in labels.items():
            mask = values != self.label_classes[name]
            if bool(mask.any()):
                active[name] = (torch.where(mask, values, torch.zeros_like(values)), mask)
        return active

    def eval(self) -> GuidedModel:
        self.model.eval()
        return self
