"""The denoiser's speed switch (config section ``sampling``): samples with bf16 calls stay
within tolerance of fp32 samples, for the policy (LoRA, label embeddings) and the reference
alike."""

import copy

import pytest
import torch

from ctrl_ray.config import load_config
from ctrl_ray.errors import InputError
from ctrl_ray.finetune_config import FinetuneConfig
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.gaussian_mixture import GaussianMixtureBackbone
from ctrl_ray.models.unet import ScheduleConfig, UNetConfig, build_scheduler, build_unet
from ctrl_ray.sampler_config import SamplingOptions
from ctrl_ray.sampling import RolloutInputs, sample

LABELS = {"ink_class": 4}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(UNetConfig(image_size=8, block_out_channels=(16, 32)))


def policy(unet, options: SamplingOptions) -> AugmentedModel:
    """The tiny UNet with perturbed LoRA and label embeddings, its calls run by `options`."""
    backbone = UNetBackbone(copy.deepcopy(unet), build_scheduler(ScheduleConfig(100)))
    torch.manual_seed(0)   # LoRA's down-projections are random
    model = AugmentedModel(backbone, LABELS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        model.label_embeddings["ink_class"].weight[-1].zero_()
    backbone.configure_calls(options)
    return model


def rollouts(model: AugmentedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 of the policy and of the reference, and the path KL, from the same noise."""
    inputs = RolloutInputs.draw(0, 6, 4, (1, 8, 8), LABELS, num_contexts=10)
    with torch.no_grad():
        policy_rollout = sample(model, inputs)
        reference = sample(model, inputs, from_reference=True)
    return policy_rollout.x0, reference.x0, policy_rollout.path_kl


def test_samples_with_bf16_calls_stay_near_fp32_samples(unet):
    """bf16 keeps 8 mantissa bits (relative error 2^-9 per rounding): the samples of a 4-step
    chain move by a few hundredths, far inside the tolerance, and stay float32."""
    tolerance = 0.1
    off = rollouts(policy(unet, SamplingOptions()))
    on = rollouts(policy(unet, SamplingOptions(bf16=True)))
    for a, b in zip(off, on, strict=True):
        assert b.dtype == torch.float32
        scale = a.abs().max().clamp(min=1.0)
        assert (a - b).abs().max() <= tolerance * scale
    assert not torch.equal(off[0], off[1])   # the policy differs from the reference


def test_sampling_options_are_config_keys_and_only_unet_backbones_take_them():
    config = load_config(FinetuneConfig, overrides=["sampling.bf16=true"])
    assert config.sampling == SamplingOptions(bf16=True)
    assert load_config(FinetuneConfig).sampling == SamplingOptions()
    with pytest.raises(InputError, match="sampling.speed"):
        load_config(FinetuneConfig, overrides=["sampling.speed=2"])
    mixture = GaussianMixtureBackbone.__new__(GaussianMixtureBackbone)
    mixture.configure_calls(SamplingOptions())
    with pytest.raises(InputError, match="UNet backbones only"):
        mixture.configure_calls(SamplingOptions(bf16=True))
