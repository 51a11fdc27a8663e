"""The augmented model of CTRL (DESIGN step 2): a frozen backbone plus zero-started new parameters.

For every new label y with K classes an ``nn.Embedding(K + 1, d)`` is added to the timestep
embedding; row K is the null label (unconditional) and stays exactly zero (it is the
``padding_idx``, so it never receives a gradient). The backbone network gets LoRA adapters
(peft, zero-initialised up-projections), full fine-tuning, or nothing. At initialisation the
augmented model therefore equals the pre-trained one, and the pre-trained model stays
available as the *reference*: the same network with the adapters disabled and the label
embedding bypassed (for full fine-tuning: the original weights through ``functional_call``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from torch.func import functional_call

from ctrl_ray.errors import InputError
from ctrl_ray.models.adapter_config import ADAPTERS, VALUE_HEAD_KEYS
from ctrl_ray.models.backbone import Backbone
from ctrl_ray.models.soft_value import SoftValueNet, SoftValueSpec


class FrozenWeights(nn.Module):
    """A frozen copy of named tensors, as non-persistent buffers so ``.to(device)`` moves it."""

    def __init__(self, named_tensors: Mapping[str, Tensor]):
        super().__init__()
        self.names = list(named_tensors)
        for index, tensor in enumerate(named_tensors.values()):
            self.register_buffer(f"tensor_{index}", tensor.detach().clone(), persistent=False)

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"tensor_{index}") for index, name in enumerate(self.names)}


class AugmentedModel(nn.Module):
    """Backbone + label embeddings + adapter: the CTRL policy, with the pre-trained model inside.

    Args:
        backbone: the frozen pre-trained noise predictor.
        label_classes: number of classes K per new label, e.g. ``{"compress_class": 4}``.
        adapter: ``"lora"`` (peft LoRA on ``backbone.network``), ``"full"`` (all weights of
            ``backbone.network`` trainable), ``"none"`` (label embeddings only) or ``"value"``
            (the backbone stays the base; a soft value head log h_t(x; y, c) steers each reverse
            step's mean toward the step tilted by h, see `mean_shift`; trained by mode
            ``value``).
        lora_rank, lora_alpha: LoRA rank and scale numerator (``lora_alpha=None`` means rank,
            i.e. scale 1).
        lora_targets: module-name suffixes that get LoRA; default ``backbone.default_lora_targets``.
        min_timestep: the new parameters act only at timesteps t >= min_timestep; below it the
            policy *is* the pre-trained model. The nearly noise-free last steps have tiny
            variances, so any change there costs many nats of KL while barely moving x0;
            gating them keeps the KL exact and the optimisation well-conditioned.
        time_buckets: each label class gets its own embedding vector in each of this many
            equal bands of timesteps (1: one vector for all t). The control the optimum needs
            differs in size along the sampler; one shared vector makes every step take the same
            compromise (`docs/update_rules.md`, section 5).
        value_head: the value head's widths (`SoftValueSpec` fields ``channels``,
            ``hidden_dim``, ``time_embedding_dim``) and its step (``step_candidates``), for
            ``adapter="value"``.
    """

    def __init__(
        self,
        backbone: Backbone,
        label_classes: Mapping[str, int],
        adapter: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
        min_timestep: int = 0,
        time_buckets: int = 1,
        value_head: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if min_timestep < 0:
            raise InputError(f"min_timestep must be >= 0, got {min_timestep}")
        if time_buckets < 1:
            raise InputError(f"time_buckets must be >= 1, got {time_buckets}")
        self.min_timestep = int(min_timestep)
        self.time_buckets = int(time_buckets)
        if adapter not in ADAPTERS:
            raise InputError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        for name, num_classes in label_classes.items():
            if not name.isidentifier():
                raise InputError(f"label name must be an identifier, got {name!r}")
            if not isinstance(num_classes, int) or num_classes < 1:
                raise InputError(
                    f"label_classes[{name!r}] must be a positive int, got {num_classes!r}"
                )
        self.backbone = backbone
        self.adapter = adapter
        self.label_classes = dict(label_classes)
        self.label_embeddings = nn.ModuleDict()
        for name, num_classes in self.label_classes.items():
            # Row y holds class y's vectors for all time buckets side by side; the last row
            # (null) stays zero.
            embedding = nn.Embedding(
                num_classes + 1, backbone.embedding_dim * self.time_buckets,
                padding_idx=num_classes,
            )
            nn.init.zeros_(embedding.weight)
            self.label_embeddings[name] = embedding

        self._lora_layers: list[BaseTunerLayer] = []
        self.reference_weights: FrozenWeights | None = None
        if adapter == "lora":
            if lora_rank < 1:
                raise InputError(f"lora_rank must be >= 1, got {lora_rank}")
            targets = list(lora_targets or backbone.default_lora_targets)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                target_modules=targets,
                init_lora_weights=True,  # lora_B = 0: the adapted layer starts equal to the base
            )
            try:
                inject_adapter_in_model(config, backbone.network)
            except ValueError as error:
                raise InputError(
                    f"lora_targets {targets} do not fit the backbone: {error}"
                ) from error
            self._lora_layers = [
                m for m in backbone.network.modules() if isinstance(m, BaseTunerLayer)
            ]
        elif adapter == "full":
            backbone.network.requires_grad_(True)
            self.reference_weights = FrozenWeights(
                {f"network.{name}": p for name, p in backbone.network.named_parameters()}
            )
        self.value_head: SoftValueNet | None = None
        if adapter == "value":
            widths = dict(value_head or {})
            unknown = sorted(set(widths) - set(VALUE_HEAD_KEYS))
            if unknown:
                raise InputError(f"value_head: unknown key(s) {unknown}; known: "
                                 f"{list(VALUE_HEAD_KEYS)}")
            text_dim = getattr(backbone, "context_embedding_dim", None)
            spec = SoftValueSpec(list(backbone.sample_shape), self.label_classes,
                                 num_contexts=None if text_dim else backbone.num_contexts,
                                 context_dim=text_dim, **widths)
            self.value_head = SoftValueNet(spec)
            self.label_embeddings.requires_grad_(False)
        self._adapter_names = [
            name
            for name, _ in self.named_parameters()
            if (name.startswith("backbone.") and (adapter == "full" or ".lora_" in name))
            or name.startswith("value_head.")
        ]
        # With a value head the labels act through h alone; the embeddings stay zero and fixed.
        self._embedding_names = [] if adapter == "value" else [
            f"label_embeddings.{name}.weight" for name in self.label_classes]
        self._reference_mode = False

    # -- what the sampler reads ------------------------------------------------------------
    @property
    def alphas_cumprod(self) -> Tensor:
        return self.backbone.alphas_cumprod

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.backbone.sample_shape

    @property
    def clip_sample(self) -> bool:
        return self.backbone.clip_sample

    @property
    def num_contexts(self) -> int | None:
        return self.backbone.num_contexts

    def decode(self, samples: Tensor) -> Tensor:
        """Images from samples (a latent backbone's VAE decoder; identity for pixel ones)."""
        return self.backbone.decode(samples)

    # -- forward ---------------------------------------------------------------------------
    def embed_labels(self, labels: Mapping[str, Tensor] | None,
                     t: Tensor | int | None = None) -> Tensor | None:
        """Sum of the label embeddings (B, d) at timestep ``t`` (needed with time buckets); a
        label that is absent counts as null (zero)."""
        if not labels:
            return None
        unknown = set(labels) - set(self.label_classes)
        if unknown:
            raise InputError(
                f"labels has unknown names {sorted(unknown)}; known: {sorted(self.label_classes)}"
            )
        total = sum(self.label_embeddings[name](values) for name, values in labels.items())
        if self.time_buckets == 1:
            return total
        num_timesteps = self.alphas_cumprod.shape[0]
        t = torch.as_tensor(t, device=total.device).expand(total.shape[0])
        bucket = (t * self.time_buckets // num_timesteps).clamp(0, self.time_buckets - 1)
        rows = total.view(total.shape[0], self.time_buckets, -1)
        return rows[torch.arange(total.shape[0], device=total.device), bucket.long()]

    def predict_noise(
        self,
        x_t: Tensor,
        t: Tensor,
        context: Tensor | None,
        labels: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The policy's noise prediction; inside ``reference()`` (or at t < min_timestep) the
        pre-trained one. With a value head it is the pre-trained one too: the head shifts the
        step's mean instead (`mean_shift`)."""
        if not self._reference_mode and self.value_head is None:
            if self.min_timestep == 0:
                return self.backbone(x_t, t, context, self.embed_labels(labels, t))
            adapted = torch.as_tensor(t >= self.min_timestep).expand(x_t.shape[0])
            if adapted.all():
                return self.backbone(x_t, t, context, self.embed_labels(labels, t))
            reference = self.reference_noise(x_t, t, context)
            if not adapted.any():
                return reference
            policy = self.backbone(x_t, t, context, self.embed_labels(labels, t))
            return torch.where(adapted.view(-1, *[1] * (x_t.dim() - 1)), policy, reference)
        if self.reference_weights is not None:
            weights = self.reference_weights.as_dict()
            return functional_call(self.backbone, weights, (x_t, t, context))
        return self.backbone(x_t, t, context)

    def mean_shift(self, mean: Tensor, sigma: Tensor, t: Tensor, next_t: Tensor,
                   context: Tensor | None, labels: Mapping[str, Tensor],
                   offsets: Tensor | None = None) -> Tensor | None:
        """The value head's control of the reverse step t -> next_t whose base mean is ``mean``:
        the shift toward the tilted step's mean, from ``offsets`` (`step_candidates` / 2 rows of
        noise per sample) or first-order (None without a head, in reference mode, or at
        t < min_timestep; `SoftValueNet.mean_shift`)."""
        if self.value_head is None or self._reference_mode or int(t) < self.min_timestep:
            return None
        return self.value_head.mean_shift(mean, sigma, next_t, self.head_context(context),
                                          labels, offsets)

    def initial_shift(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                      labels: Mapping[str, Tensor], offsets: Tensor) -> Tensor | None:
        """The value head's tilt of x_T ~ N(0, I): the shift of its mean toward that of
        N(0, I) h_T(x) / E[h_T], from ``offsets`` (`initial_candidates` / 2 rows of noise per
        sample; None without a head or its tilt, in reference mode, or at t < min_timestep).
        The optimum tilts x_T itself; a policy that starts from N(0, I) can only make up for it
        in the first step, at 1 / sigma^2 the KL (docs/update_rules.md, section 13)."""
        if (self.value_head is None or self._reference_mode or int(t) < self.min_timestep
                or not self.value_head.spec.initial_candidates):
            return None
        return self.value_head.mean_shift(torch.zeros_like(x_t), torch.ones((), dtype=x_t.dtype,
                                          device=x_t.device), t, self.head_context(context),
                                          labels, offsets)

    @property
    def initial_candidates(self) -> int:
        """Base candidates per sample of the value head's tilt of x_T (0: none)."""
        return 0 if self.value_head is None else self.value_head.spec.initial_candidates

    @property
    def step_candidates(self) -> int:
        """Base candidates per sample of the value head's step (0: the first-order step)."""
        return 0 if self.value_head is None else self.value_head.spec.step_candidates

    def head_context(self, context: Tensor | None) -> Tensor | None:
        """What the value head reads for contexts (B,): a text backbone's prompt embeddings
        (so a prompt never seen in training works), class indices otherwise."""
        if context is None or self.value_head is None or not self.value_head.spec.context_dim:
            return context
        return self.backbone.context_embedding(context)

    def reference_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """The pre-trained model's noise prediction (frozen weights; differentiable in x_t)."""
        with self.reference():
            return self.predict_noise(x_t, t, context)

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the model is the pre-trained one: adapters off, labels bypassed."""
        if self._reference_mode:
            yield
            return
        # peft's enable_adapters also flips requires_grad of the adapter weights: restore it.
        lora_parameters = self._adapter_parameters() if self._lora_layers else []
        requires_grad = [p.requires_grad for p in lora_parameters]
        self._reference_mode = True
        for layer in self._lora_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._lora_layers:
                layer.enable_adapters(True)
            for parameter, flag in zip(lora_parameters, requires_grad, strict=True):
                parameter.requires_grad_(flag)
            self._reference_mode = False

    # -- trainable state -------------------------------------------------------------------
    def _adapter_parameters(self) -> list[nn.Parameter]:
        parameters = dict(self.named_parameters())
        return [parameters[name] for name in self._adapter_names]

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters as ``embedding`` and ``adapter`` (separate learning rates)."""
        parameters = dict(self.named_parameters())
        return {
            "embedding": [parameters[name] for name in self._embedding_names],
            "adapter": [parameters[name] for name in self._adapter_names],
        }

    def num_trainable_parameters(self) -> int:
        """Number of trainable scalars (the embeddings' fixed null rows included)."""
        return sum(p.numel() for group in self.trainable_parameter_groups().values() for p in group)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only the trainable tensors (label embeddings + adapter), as contiguous CPU copies."""
        parameters = dict(self.named_parameters())
        return {
            name: parameters[name].detach().to("cpu", copy=True).contiguous()
            for name in self._embedding_names + self._adapter_names
        }

    def load_trainable_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load tensors from ``trainable_state_dict``; names and shapes must match exactly."""
        parameters = dict(self.named_parameters())
        expected = set(self._embedding_names + self._adapter_names)
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise InputError(
                f"trainable state dict does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, value in state_dict.items():
            if tuple(value.shape) != tuple(parameters[name].shape):
                raise InputError(
                    f"trainable state dict entry {name!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(parameters[name].shape)}"
                )
        for label in self.label_classes if self._embedding_names else ():
            null_row = state_dict[f"label_embeddings.{label}.weight"][-1]
            if torch.any(null_row != 0):
                raise InputError(f"the null-label row of embedding {label!r} must be zero")
        with torch.no_grad():
            for name, value in state_dict.items():
                parameters[name].copy_(value)

    def validate_labels(self, labels: Mapping[str, Tensor], batch_size: int) -> None:
        """Raise ``InputError`` unless every label is a (B,) integer tensor with values in 0..K."""
        for name, values in labels.items():
            if name not in self.label_classes:
                raise InputError(
                    f"labels has unknown name {name!r}; known: {sorted(self.label_classes)}"
                )
            num_classes = self.label_classes[name]
            if values.dtype != torch.long or tuple(values.shape) != (batch_size,):
                raise InputError(
                    f"labels[{name!r}] must be a long tensor of shape ({batch_size},), "
                    f"got {values.dtype} {tuple(values.shape)}"
                )
            if values.numel() and (values.min() < 0 or values.max() > num_classes):
                raise InputError(
                    f"labels[{name!r}] must lie in 0..{num_classes} ({num_classes} = null), "
                    f"got values {values.min().item()}..{values.max().item()}"
                )
