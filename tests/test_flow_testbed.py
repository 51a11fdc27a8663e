"""The flow testbed: a tiny SD3 transformer trained here on a tiny latent testbed's latents saves a
folder with diffusers' SD3 layout that diffusers loads and samples exactly as ctrl-ray's Euler
loop does and ctrl-ray's loader turns into a flow backbone, reusing the latent testbed's VAE and
text encoder; bad configs stop naming their key."""

from __future__ import annotations

import json

import pytest
import torch

from ctrl_ray.cli import main
from ctrl_ray.config import ConfigValueError, load_config
from ctrl_ray.errors import InputError
from ctrl_ray.flow_testbed_config import FlowTestbedConfig, FlowTransformerConfig

TINY_FLOW = [
    "transformer.num_layers=2",
    "transformer.num_attention_heads=2",
    "transformer.attention_head_dim=8",
    "transformer.steps=6",
    "transformer.batch_size=16",
    "transformer.warmup_steps=2",
    "transformer.log_every=3",
    "registered_model=",
]
NO_SECOND_ENCODERS = {"text_encoder_2": None, "tokenizer_2": None, "text_encoder_3": None,
                      "tokenizer_3": None}


@pytest.fixture(scope="module")
def flow_testbed(trained_text_testbed, tmp_path_factory):
    """A tiny flow testbed on the tiny latent testbed (4x4x4 latents, 8x8 digits)."""
    from ctrl_ray.flow_testbed import build_flow_testbed

    out = tmp_path_factory.mktemp("flow") / "testbed"
    config = load_config(FlowTestbedConfig, "configs/pretrain_flow.yaml", [
        *TINY_FLOW, f"latent_testbed={trained_text_testbed}", f"output_dir={out}"])
    result = build_flow_testbed(config, progress=False)
    assert result.model_dir == out and result.final_loss == result.final_loss  # not NaN
    return out


def test_folder_has_the_sd3_layout(flow_testbed, trained_text_testbed):
    parts = {path.name for path in flow_testbed.iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler",
            "ctrl_ray.json"} <= parts
    index = json.loads((flow_testbed / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert all(index[name] == [None, None] for name in NO_SECOND_ENCODERS)
    metadata = json.loads((flow_testbed / "ctrl_ray.json").read_text())
    latent = json.loads((trained_text_testbed / "ctrl_ray.json").read_text())
    assert metadata["kind"] == "sd3" and metadata["built_by"] == "ctrl_ray.flow_testbed"
    assert metadata["prompts"][7] == "a handwritten seven"
    for key in ("training_prompts", "heldout_prompts", "heldout_prompt_digits", "dataset",
                "text_encoder", "max_length", "prompt_dropout"):
        assert metadata[key] == latent[key], key
    assert metadata["latent_shape"] == [4, 4, 4] and metadata["image_shape"] == [1, 8, 8]
    assert metadata["training"]["transformer"]["steps"] == 6


def test_reuses_the_latent_testbeds_vae_and_encoder(flow_testbed, trained_text_testbed):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    ours = AutoencoderKL.from_pretrained(flow_testbed / "vae")
    theirs = AutoencoderKL.from_pretrained(trained_text_testbed / "vae")
    assert ours.config.scaling_factor == theirs.config.scaling_factor
    assert ours.config.shift_factor == 0.0  # SD3's pipeline adds it after unscaling
    for name, tensor in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, rtol=0, atol=0)
    encoder = load_file(flow_testbed / "text_encoder" / "model.safetensors")
    reference = load_file(trained_text_testbed / "text_encoder" / "model.safetensors")
    assert encoder.keys() == reference.keys()
    assert all(torch.equal(encoder[k], reference[k]) for k in reference)


def test_diffusers_samples_it_as_our_euler_loop_does(flow_testbed):
    from diffusers import StableDiffusion3Pipeline

    from ctrl_ray.flow_testbed import sample_latents
    from ctrl_ray.models.text_encoder import load_pretrained_encoder

    pipeline = StableDiffusion3Pipeline.from_pretrained(flow_testbed, **NO_SECOND_ENCODERS)
    encoder = load_pretrained_encoder(flow_testbed / "text_encoder", flow_testbed / "tokenizer")
    assert encoder.max_length == 16  # the tokenizer keeps the training length
    states, pooled = encoder.encode_with_embedding(["the digit 3", "a sketch of a seven"])
    empty = encoder.encode_with_embedding([""])
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    call = {"prompt_embeds": states, "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": empty[0].expand(2, -1, -1),
            "negative_pooled_prompt_embeds": empty[1].expand(2, -1), "guidance_scale": 3.0,
            "num_inference_steps": 3, "latents": noise}
    latents = pipeline(**call, output_type="latent").images
    ours = sample_latents(pipeline.transformer, pipeline.scheduler, (states, pooled), empty,
                          3.0, 3, noise)
    torch.testing.assert_close(latents, ours)
    unguided = sample_latents(pipeline.transformer, pipeline.scheduler, (states, pooled), empty,
                              1.0, 3, noise)
    assert not torch.allclose(unguided, ours)
    images = pipeline(**call, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_ctrl_ray_loads_it_as_a_flow_backbone(flow_testbed):
    from ctrl_ray.evaluation import generate
    from ctrl_ray.models.augmented import AugmentedModel
    from ctrl_ray.models.loading import build_backbone, load_base_model_dir
    from ctrl_ray.models.text_to_image import TextToImageOptions

    base = load_base_model_dir(flow_testbed)
    assert base.transformer is not None and base.metadata["kind"] == "sd3"
    assert base.image_shape == (1, 8, 8) and base.num_contexts == 10
    backbone = build_backbone(base, TextToImageOptions(
        prompts=["the digit 3", "a sketch of a seven"], guidance_scale=3.0))
    assert tuple(backbone.sample_shape) == (4, 4, 4)
    model = AugmentedModel(backbone, {}, adapter="none").eval()
    images, _ = generate(model, torch.tensor([0, 1, 1]), {}, [0, 1, 2],
                         num_inference_steps=3, from_reference=True)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_training_times_follow_the_configured_law():
    from ctrl_ray.flow_testbed import training_times

    generator = torch.Generator().manual_seed(0)
    logit = training_times(20000, FlowTransformerConfig(), generator)
    uniform = training_times(20000, FlowTransformerConfig(timestep_sampling="uniform"),
                             generator)
    for s in (logit, uniform):
        assert 0 < s.min() and s.max() < 1
        assert abs(s.median().item() - 0.5) < 0.02
    assert ((logit - 0.5).abs() < 0.25).float().mean() > 0.65  # the middle times dominate
    assert abs(((uniform - 0.5).abs() < 0.25).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(("override", "key"), [
    ("transformer.patch_size=0", "transformer.patch_size"),
    ("transformer.timestep_sampling=cosmap", "transformer.timestep_sampling"),
    ("transformer.ema_decay=1", "transformer.ema_decay"),
    ("scheduler.shift=0", "scheduler.shift"),
    ("text.prompt_dropout=1", "text.prompt_dropout"),
    ("latent_testbed=", "latent_testbed"),
])
def test_bad_config_names_its_key(override, key):
    with pytest.raises(InputError) as caught:
        load_config(FlowTestbedConfig, overrides=[override])
    assert f"config key {key!r}" in str(caught.value)


def test_the_reused_testbed_is_checked_before_training(trained_text_testbed, tmp_path, capsys):
    from ctrl_ray.flow_testbed_config import read_latent_testbed

    base = [f"latent_testbed={trained_text_testbed}", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigValueError) as caught:  # 4x4 latents: patches of 3 do not tile
        read_latent_testbed(load_config(FlowTestbedConfig,
                                        overrides=[*base, "transformer.patch_size=3"]))
    assert caught.value.key == "transformer.patch_size"
    with pytest.raises(ConfigValueError) as caught:
        read_latent_testbed(load_config(FlowTestbedConfig,
                                        overrides=[*base, "text.max_length=20"]))
    assert caught.value.key == "text.max_length"
    with pytest.raises(InputError, match="build the latent testbed first"):
        read_latent_testbed(load_config(FlowTestbedConfig, overrides=[
            f"latent_testbed={tmp_path}", f"output_dir={tmp_path / 'out'}"]))

    argv = ["flow", "build", "--config", "configs/pretrain_flow.yaml",
            *[arg for override in [*TINY_FLOW, *base] for arg in ("--set", override)]]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert main(argv) == 2
    assert "output_dir" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "x"
    assert main([*argv, "--set", f"output_dir={trained_text_testbed / 'flow'}"]) == 2
    assert "latent_testbed" in capsys.readouterr().err
