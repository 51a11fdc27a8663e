"""The latent text-to-image testbed: a tiny one trained here loads with ctrl-ray's loader and with
diffusers, samples latents that decode to images, and bad configs stop naming their key."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_TEXT_TESTBED

from ctrl_ray.cli import main
from ctrl_ray.config import ConfigValueError, load_config
from ctrl_ray.data.digits import HELDOUT_TEMPLATES, TRAINING_TEMPLATES, template_prompts
from ctrl_ray.latent_testbed import LatentTestbedConfig
from ctrl_ray.models.loading import build_backbone, load_base_model_dir
from ctrl_ray.models.text_to_image import TextToImageOptions


def test_folder_has_the_stable_diffusion_layout(trained_text_testbed):
    parts = {path.name for path in trained_text_testbed.iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
            "ctrl_ray.json"} <= parts
    index = json.loads((trained_text_testbed / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    metadata = json.loads((trained_text_testbed / "ctrl_ray.json").read_text())
    assert metadata["prompts"][7] == "a handwritten seven"
    assert set(metadata["training_prompts"]).isdisjoint(metadata["heldout_prompts"])
    assert metadata["training"]["vae"]["scaling_factor"] > 0


def test_loads_samples_and_decodes(trained_text_testbed):
    from ctrl_ray.evaluation import generate
    from ctrl_ray.models.augmented import AugmentedModel

    base = load_base_model_dir(trained_text_testbed)
    assert base.is_text_to_image and base.image_shape == (1, 8, 8)
    assert base.vae.config.scaling_factor == pytest.approx(
        json.loads((trained_text_testbed / "ctrl_ray.json").read_text())
        ["training"]["vae"]["scaling_factor"])
    assert base.prompt_encoder.max_length == 16  # the tokenizer keeps the training length
    backbone = build_backbone(base, TextToImageOptions(
        prompts=["the digit 3", "a sketch of a seven"], guidance_scale=3.0))
    assert backbone.is_latent and tuple(backbone.sample_shape) == (4, 4, 4)
    model = AugmentedModel(backbone, {}, adapter="none").eval()
    images, _ = generate(model, torch.tensor([0, 1, 1]), {}, [0, 1, 2],
                         num_inference_steps=3, from_reference=True)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_diffusers_loads_it_and_encodes_prompts_as_training_did(trained_text_testbed):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(trained_text_testbed)
    assert isinstance(pipeline, StableDiffusionPipeline)
    out = pipeline(["a handwritten two", "the digit 5"], num_inference_steps=2,
                   guidance_scale=2.0, output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    states, _ = pipeline.encode_prompt(["a handwritten two"], "cpu", 1, False)
    ours = load_base_model_dir(trained_text_testbed).prompt_encoder.encode(["a handwritten two"])
    torch.testing.assert_close(states, ours)


def test_training_and_heldout_prompts_are_disjoint():
    training, digits = template_prompts(TRAINING_TEMPLATES)
    heldout, heldout_digits = template_prompts(HELDOUT_TEMPLATES)
    assert len(training) == len(digits) == 10 * 2 * len(TRAINING_TEMPLATES)
    assert set(training).isdisjoint(heldout)
    assert training[7] == "a handwritten seven" and training[17] == "a handwritten 7"
    assert heldout_digits[:10] == list(range(10))


@pytest.mark.parametrize(("override", "key"), [
    ("vae.block_out_channels=[8, 12]", "vae.block_out_channels"),
    ("vae.kl_weight=-1", "vae.kl_weight"),
    ("unet.steps=0", "unet.steps"),
    ("text.templates=['no placeholder']", "text.templates"),
    (f"text.templates=['{HELDOUT_TEMPLATES[0]}']", "text.templates"),
    ("text.encoder=clip", "text.encoder"),
    ("schedule.clip_sample=true", "schedule.clip_sample"),
    ("vae.block_out_channels=[8, 8, 8, 8, 8, 8, 8]", "vae.block_out_channels"),
    ("unet.block_out_channels=[8, 8, 8, 8, 8]", "unet.block_out_channels"),
    ("output_dir=", "output_dir"),
])
def test_bad_config_names_its_key(override, key):
    with pytest.raises(ConfigValueError) as caught:
        load_config(LatentTestbedConfig, overrides=[override])
    assert caught.value.key == key


def test_cli_refuses_bad_input_before_training(tmp_path, digits8, capsys):
    config = tmp_path / "testbed.yaml"
    config.write_text(f"data: {{path: {digits8}, size: 8}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["text2image", "build", "--config", str(config),
                 "--set", "vae.kl_weight=-1"]) == 2
    assert "'vae.kl_weight'" in capsys.readouterr().err
    assert main(["text2image", "build", "--config", str(config), "--set", "data.size=16"]) == 2
    assert "data.path" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert main(["text2image", "build", "--config", str(config),
                 "--set", "vae.block_out_channels=[8, 8]"]) == 2
    assert "output_dir" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep").read_text() == "x"


def test_cli_builds_and_registers(tmp_path, digits8, capsys):
    from ctrl_ray.registry import load_base_model

    out = tmp_path / "testbed"
    overrides = [*TINY_TEXT_TESTBED, f"data.path={digits8}", f"output_dir={out}",
                 "vae.steps=2", "unet.steps=2", "registered_model=ctrl-test-text2image"]
    argv = ["text2image", "build", "--config", "configs/pretrain_text2image.yaml"]
    assert main([*argv, *[arg for o in overrides for arg in ("--set", o)]]) == 0
    printed = capsys.readouterr().out
    uri = printed.split("registered ")[1].split()[0]
    assert uri.startswith("models:/ctrl-test-text2image/")
    base = load_base_model(uri)
    assert base.is_text_to_image and base.metadata["prompts"][0] == "a handwritten zero"
