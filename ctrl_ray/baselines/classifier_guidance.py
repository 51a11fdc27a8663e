"""Classifier guidance (Dhariwal & Nichol): a time-dependent classifier p(y | x_t, t) trained on
noised pairs, its gradient added to the score of the frozen pre-trained model:

    eps_guided = eps_pre(x_t, t, c) - s * sqrt(1 - a_t) * grad_{x_t} log p(y | x_t, t)

(the score is -eps / sqrt(1 - a_t), so this is score + s * grad log p(y | x_t, t)). The
classifier is `ImageClassifier`'s conv body with a sinusoidal timestep embedding projected and
added after every block; it sees only the N pairs, each noised at a fresh t ~ U{0..T-1}.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from ctrl_ray.baseline_config import NoisyClassifierTrainingConfig
from ctrl_ray.baselines import GuidedModel
from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.classifier import ClassifierConfig, ImageClassifier, check_indices
from ctrl_ray.storage import load_artifact, save_artifact

CONFIG_FILE = "noisy_classifier.json"
FORMAT_NAME = "ctrl_ray.noisy_classifier"


@dataclass
class NoisyClassifierSpec:
    """Architecture and label metadata of a `NoisyClassifier`."""

    label_name: str
    num_classes: int
    image_size: int
    num_train_timesteps: int
    channels: tuple[int, ...] = (16, 32)
    time_embedding_dim: int = 64
    edges: list[float] | None = None


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): conv stages of `ImageClassifier` plus a timestep shift after every block."""

    def __init__(self, spec: NoisyClassifierSpec):
        super().__init__()
        self.spec = spec
        self.body = ImageClassifier(ClassifierConfig(
            num_classes=spec.num_classes, image_size=spec.image_size, channels=spec.channels))
        dim = spec.time_embedding_dim
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        widths = [block[0].out_channels for block in self.body.features]
        self.time_shifts = nn.ModuleList(nn.Linear(dim, width) for width in widths)

    @property
    def label_name(self) -> str:
        return self.spec.label_name

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Logits (B, K) for noisy images (B, 1, H, W) at integer timesteps t (B,)."""
        size = self.spec.image_size
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (1, size, size):
            raise InputError(f"x_t: expected shape (B, 1, {size}, {size}), got {tuple(x_t.shape)}")
        embedding = get_timestep_embedding(t.reshape(-1).float(), self.spec.time_embedding_dim)
        embedding = self.time_mlp(embedding.to(x_t.dtype))
        hidden = x_t
        for block, shift in zip(self.body.features, self.time_shifts, strict=True):
            hidden = block(hidden) + shift(embedding)[:, :, None, None]
        return self.body.head(hidden.mean(dim=(2, 3)))

    def log_probs(self, x_t: Tensor, t: Tensor) -> Tensor:
        return F.log_softmax(self(x_t, t), dim=-1)

    def save(self, path_dir: str | Path) -> Path:
        """Atomic directory: safetensors weights + JSON spec (`save_artifact`)."""
        return save_artifact(path_dir, FORMAT_NAME, {"spec": asdict(self.spec)},
                             self.state_dict(), index=CONFIG_FILE)

    @classmethod
    def load(cls, path_dir: str | Path) -> NoisyClassifier:
        directory = Path(path_dir)
        document, tensors = load_artifact(directory, FORMAT_NAME, "noisy classifier",
                                          index=CONFIG_FILE)
        try:
            spec = NoisyClassifierSpec(**document["spec"])
            spec.channels = tuple(int(width) for width in spec.channels)
            model = cls(spec)
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{str(directory / CONFIG_FILE)!r}: bad spec ({error})") from None
        try:
            model.load_state_dict(tensors)
        except RuntimeError as error:
            raise InputError(f"noisy classifier weights in {str(directory)!r} do not match its "
                             f"spec: {error}") from None
        return model.eval().requires_grad_(False)


def noised(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (the forward process of the base model)."""
    alpha = alphas_cumprod[t].view(-1, 1, 1, 1)
    return alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise


def train_noisy_classifier(images: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                           alphas_cumprod: Tensor, *, num_classes: int, label_name: str,
                           edges: Sequence[float] | None = None,
                           config: NoisyClassifierTrainingConfig | None = None,
                           progress: bool = False) -> tuple[NoisyClassifier, dict]:
    """Fit p(y | x_t, t) with cross-entropy on pairs noised by the base model's schedule.

    Returns the classifier (eval mode, frozen) and a report with the held-out accuracy at a low,
    a middle and a high noise level (the same noise for every evaluation, so it is comparable).
    """
    config = config or NoisyClassifierTrainingConfig()
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    labels = check_indices(labels, num_classes, "labels", images.shape[0])
    alphas = alphas_cumprod.detach().float().cpu()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(images.shape[0], generator=generator)
    num_val = int(round(config.val_fraction * images.shape[0]))
    val_rows, train_rows = order[:num_val], order[num_val:]
    if train_rows.numel() == 0:
        raise InputError(f"labels: {images.shape[0]} pairs leave nothing to train on")
    spec = NoisyClassifierSpec(label_name=label_name, num_classes=int(num_classes),
                               image_size=int(images.shape[-1]), num_train_timesteps=len(alphas),
                               channels=config.channels,
                               time_embedding_dim=config.time_embedding_dim,
                               edges=None if edges is None else [float(e) for e in edges])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = NoisyClassifier(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / config.steps)))
    start = time.perf_counter()
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"noisy classifier {label_name}", unit="step")
    model.train()
    running, history = 0.0, []
    for step in steps:
        rows = train_rows[torch.randint(0, train_rows.numel(), (config.batch_size,),
                                        generator=generator)]
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=generator)
        noise = torch.randn(images[rows].shape, generator=generator)
        loss = F.cross_entropy(model(noised(images[rows], t, alphas, noise), t), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, "loss": running / ((step % 100) + 1)})
            running = 0.0
    model.eval().requires_grad_(False)
    report = {"label_name": label_name, "num_train": int(train_rows.numel()),
              "num_val": int(num_val), "seconds": time.perf_counter() - start,
              "final_loss": history[-1]["loss"], "history": history}
    if num_val:
        evaluation = torch.Generator().manual_seed(config.seed + 1)
        noise = torch.randn(images[val_rows].shape, generator=evaluation)
        for fraction in (0.05, 0.5, 0.9):
            t = torch.full((num_val,), int(fraction * (len(alphas) - 1)))
            with torch.no_grad():
                predicted = model(noised(images[val_rows], t, alphas, noise), t).argmax(1)
            accuracy = float((predicted == labels[val_rows]).float().mean())
            report[f"val_accuracy_t{int(t[0])}"] = accuracy
    return model, report


class ClassifierGuidedModel(GuidedModel):
    """The frozen pre-trained model steered by the gradients of time-dependent classifiers.

    With several labels the log-probabilities add (labels independent given x_t); rows whose
    label is null get no guidance from that classifier.
    """

    def __init__(self, model: AugmentedModel, classifiers: Sequence[NoisyClassifier],
                 guidance_scale: float):
        names = [classifier.label_name for classifier in classifiers]
        if not classifiers or len(set(names)) != len(names):
            raise InputError(f"classifiers: need one per label, got labels {names}")
        super().__init__(model, {c.label_name: c.num_classes for c in classifiers},
                         guidance_scale)
        self.classifiers = list(classifiers)
        device = model.alphas_cumprod.device
        for classifier in self.classifiers:
            classifier.to(device).eval().requires_grad_(False)

    def guided_noise(self, x_t: Tensor, t: Tensor, context: Tensor | None,
                     labels: dict[str, Tensor]) -> Tensor:
        eps = self.model.reference_noise(x_t, t, context)
        self.remember_reference(x_t, t, context, eps)
        active = self.active_labels(labels)
        if not active or self.guidance_scale == 0:
            return eps
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            total = x.new_zeros(())
            for classifier in self.classifiers:
                if classifier.label_name in active:
                    target, mask = active[classifier.label_name]
                    log_p = classifier.log_probs(x, t).gather(1, target[:, None]).squeeze(1)
                    total = total + (log_p * mask).sum()
            (gradient,) = torch.autograd.grad(total, x)
        _, sigma = self.noise_level(t, x_t)
        return eps - self.guidance_scale * sigma * gradient
