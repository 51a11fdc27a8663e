"""Text-to-image backbones: a tiny Stable-Diffusion-format pipeline (random weights, tokenizer
built offline) through CFG, the VAE decode, fine-tuning on Ray, the registry and sampling; and
the MiniLM text-conditioned pixel model on the digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_PRETRAIN

from ctrl_ray import registry
from ctrl_ray.cli import main
from ctrl_ray.config import load_config
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import generate
from ctrl_ray.finetune import FinetuneConfig, build_setup, finetune
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.loading import build_backbone
from ctrl_ray.models.text_to_image import (
    TextToImageBackbone,
    TextToImageOptions,
    reward_view,
)
from ctrl_ray.models.tiny_pipeline import TinyPipelineConfig, build_tiny_pipeline
from ctrl_ray.policy import load_any
from ctrl_ray.registry import load_base_model
from ctrl_ray.sampling.sampler import RolloutInputs, sample

PROMPTS = ["a handwritten seven", "a handwritten one"]

PULL = """
import sys, numpy as np, pandas as pd, mlflow
model = mlflow.pyfunc.load_model("models:/ctrl-text-tiny@champion")
frame = pd.DataFrame({"c": ["a handwritten seven", "a handwritten one", "a zero"],
                      "y": [0, 3, -1], "seed": [5, 6, 7]})
np.save(sys.argv[1], model.predict(frame))
"""


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """An 8x8 RGB pipeline whose VAE downsamples 2x: latents (4, 4, 4)."""
    config = TinyPipelineConfig(image_size=8, vae_channels=[8, 16], unet_channels=[16, 32])
    return build_tiny_pipeline(config, tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def pipeline_uri(pipeline_dir):
    """The same pipeline registered as a base model: `models:/tiny-sd/1`."""
    return registry.register_base_model(pipeline_dir, "tiny-sd")


def test_cli_writes_a_pipeline_that_registers_and_loads_from_models_uri(tmp_path, capsys):
    out = tmp_path / "cli-sd"
    assert main(["text2image", "tiny-pipeline", "--out", str(out), "--set", "image_size=8",
                 "--set", "vae_channels=[8, 16]", "--set", "prompts=[a seven]"]) == 0
    assert main(["registry", "register-base", "--model", str(out), "--name", "cli-sd",
                 "--alias", "base"]) == 0
    assert "models:/cli-sd/1" in capsys.readouterr().out
    base = load_base_model("models:/cli-sd@base")
    assert base.vae is not None and base.metadata["prompts"] == ["a seven"]
    assert base.image_shape == (3, 8, 8)
    assert main(["registry", "register-base", "--model", str(tmp_path), "--name", "x"]) == 2


def test_class_models_refuse_prompts(tmp_path, capsys):
    from ctrl_ray.models.loading import save_base_model
    from ctrl_ray.models.unet import ScheduleConfig, UNetConfig, build_scheduler, build_unet

    unet = build_unet(UNetConfig(image_size=8, block_out_channels=(16, 32)))
    path = save_base_model(unet, build_scheduler(ScheduleConfig()), tmp_path / "class-base",
                           {"kind": "unet2d-class-conditional", "image_shape": [1, 8, 8],
                            "num_contexts": 10})
    with pytest.raises(InputError, match="text-to-image models only"):
        build_backbone(load_base_model(path), TextToImageOptions(prompts=["a seven"]))
    assert main(["sample", "--model", str(path), "--prompt", "a seven", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _policy(pipeline_dir, **options) -> AugmentedModel:
    base = load_base_model(pipeline_dir)
    backbone = build_backbone(base, TextToImageOptions(prompts=PROMPTS, **options))
    torch.manual_seed(0)
    return AugmentedModel(backbone, {"compress_class": 4})


def _perturb(model: AugmentedModel) -> None:
    """Move every trainable tensor off its zero start, as training would."""
    with torch.no_grad():
        for group in model.trainable_parameter_groups().values():
            for parameter in group:
                parameter.add_(0.1 * torch.randn_like(parameter))
        for embedding in model.label_embeddings.values():
            embedding.weight[-1].zero_()


def test_tiny_pipeline_loads_as_a_latent_text_backbone(pipeline_dir):
    assert (pipeline_dir / "model_index.json").is_file()
    model = _policy(pipeline_dir)
    backbone = model.backbone
    assert isinstance(backbone, TextToImageBackbone)
    assert backbone.sample_shape == (4, 4, 4) and backbone.image_shape == (3, 8, 8)
    assert backbone.num_contexts == 2 and not backbone.clip_sample
    # LoRA sits on the UNet's attention projections only (not the text encoder or the VAE).
    adapted = model.trainable_parameter_groups()["adapter"]
    names = [n for n, p in model.named_parameters() if any(p is q for q in adapted)]
    assert names and all(n.startswith("backbone.network.") and ".attn" in n for n in names)
    assert backbone.decode(torch.zeros(2, 4, 4, 4)).shape == (2, 3, 8, 8)
    # A new prompt is encoded on the fly and gets the next index; a known one keeps its own.
    assert backbone.add_prompt("a zero") == 2 and backbone.add_prompt(PROMPTS[0]) == 0
    with pytest.raises(InputError, match="prompt indices"):
        backbone.predict_noise(torch.zeros(1, 4, 4, 4), torch.tensor(10), torch.tensor([3]))


def test_guidance_applies_to_policy_and_reference_alike(pipeline_dir):
    model = _policy(pipeline_dir, guidance_scale=3.0)
    x = torch.randn(2, 4, 4, 4)
    t = torch.tensor([500, 20])
    context = torch.tensor([0, 1])
    labels = {"compress_class": torch.tensor([1, 2])}
    # Zero-initialised: the guided policy is exactly the guided pre-trained model.
    assert torch.equal(model.predict_noise(x, t, context, labels),
                       model.reference_noise(x, t, context))
    _perturb(model)
    backbone = model.backbone
    extra = model.embed_labels(labels)
    cond = backbone._unet(x, t, backbone.prompt_states[context], extra)
    uncond = backbone._unet(x, t, backbone.empty_prompt_states.expand(2, -1, -1), extra)
    torch.testing.assert_close(model.predict_noise(x, t, context, labels),
                               uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    with model.reference():
        cond_ref = backbone._unet(x, t, backbone.prompt_states[context], None)
        uncond_ref = backbone._unet(x, t, backbone.empty_prompt_states.expand(2, -1, -1), None)
    torch.testing.assert_close(model.reference_noise(x, t, context),
                               uncond_ref + 3.0 * (cond_ref - uncond_ref), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.predict_noise(x, t, context, labels),
                              model.reference_noise(x, t, context))


def test_reward_view_turns_rgb_into_luma_and_resizes():
    images = torch.zeros(2, 3, 16, 16)
    images[:, 0] = 1.0  # pure red
    gray = reward_view(images, channels=1, image_size=8)
    assert gray.shape == (2, 1, 8, 8)
    torch.testing.assert_close(gray, torch.full((2, 1, 8, 8), 0.299))
    same = torch.randn(2, 1, 8, 8)
    assert reward_view(same, 1, 8) is same
    with pytest.raises(InputError, match="channel"):
        reward_view(torch.zeros(1, 2, 8, 8), 1, 8)


def _config(pipeline_dir, tiny_reward, out, *extra) -> FinetuneConfig:
    """A pathwise run on the tiny pipeline (every rule x backbone: tests/test_rule_matrix.py)."""
    return load_config(FinetuneConfig, overrides=[
        f"base_model={pipeline_dir}",
        f"rewards=[{{path: {tiny_reward}}}]",
        "judge=''",
        f"backbone.prompts={PROMPTS}",
        "backbone.guidance_scale=2.0",
        "backbone.mixed_precision=bf16",
        "backbone.gradient_checkpointing=true",
        "objective.batch_size=4",
        "objective.num_inference_steps=3",
        "objective.lr_embedding=0.05",
        "objective.lr_adapter=0.005",
        "mode=pathwise", "objective.truncation.mode=fixed", "objective.truncation.k=2",
        "iterations=2",
        "checkpoint_every=2",
        "evaluate_base=false",
        "evaluation.samples_per_target=1",
        "evaluation.contexts=[0]",
        "evaluation.num_inference_steps=3",
        f"output_dir={out}",
        *extra,
    ])


def test_pathwise_gradient_reaches_the_adapter_through_the_vae_decode(pipeline_dir, tiny_reward,
                                                                      tmp_path):
    # UNet gradient checkpointing on, inside the sampler's checkpoint, reward and KL both
    # back-propagated: the reference's calls must recompute with the adapters off.
    setup = build_setup(_config(pipeline_dir, tiny_reward, tmp_path / "run"))
    model = setup.model
    assert model.backbone.gradient_checkpointing
    _perturb(model)
    inputs = RolloutInputs.draw(0, 2, 3, model.sample_shape, model.label_classes,
                                num_contexts=model.num_contexts)
    trajectory = sample(model, inputs, differentiable=True, gradient_steps=2)
    reward = setup.reward_fn(trajectory.x0, trajectory.labels, trajectory.contexts)
    assert trajectory.path_kl.min() > 0
    (trajectory.path_kl - reward).sum().backward()
    adapter = setup.model.trainable_parameter_groups()["adapter"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter)
    vae = model.backbone.vae
    assert all(p.grad is None for p in vae.parameters())  # frozen, but on the gradient path


def test_finetune_on_ray_register_pull_and_sample_by_prompt(pipeline_uri, tiny_reward,
                                                           ray_session, tmp_path, capsys):
    config = _config(pipeline_uri, tiny_reward, tmp_path / "run", "distributed.workers=2")
    result = finetune(config, progress=False)
    policy_dir = result["policy_dir"]
    assert result["ctrl"]["num_samples"] == 4  # 4 classes x 1 prompt x 1 sample, evaluated

    uri = registry.register_policy(policy_dir, "ctrl-text-tiny", "champion")
    info = mlflow.models.get_model_info(uri).metadata["ctrl_ray"]
    assert info["backbone"]["kind"] == "stable-diffusion"
    assert info["backbone"]["prompts"] == PROMPTS and info["backbone"]["guidance_scale"] == 2.0

    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "models:/ctrl-text-tiny@champion", "--prompt",
                 "a handwritten seven", "--y", "0", "--n", "2", "--out", str(grid)]) == 0
    assert grid.is_file()
    assert main(["sample", "--model", "models:/ctrl-text-tiny@champion", "--c", "5",
                 "--out", str(tmp_path / "other.png")]) == 2
    assert "contexts 0..1" in capsys.readouterr().err

    pulled_file = tmp_path / "pulled.npy"
    subprocess.run([sys.executable, "-c", PULL, str(pulled_file)], check=True)
    pulled = np.load(pulled_file)
    local = load_any(policy_dir)
    assert local.model.backbone.guidance_scale == 2.0
    contexts = torch.tensor([0, 1, local.model.backbone.add_prompt("a zero")])
    images, _ = generate(local.model, contexts, {"compress_class": torch.tensor([0, 3, 4])},
                         [5, 6, 7], **local.sampling)
    assert pulled.shape == (3, 3, 8, 8)
    np.testing.assert_allclose(pulled, images.numpy(), atol=1e-5, rtol=0)


def test_minilm_pixel_model_pretrains_and_samples_a_handwritten_seven(digits8, tmp_path):
    from ctrl_ray.pretrain import PretrainConfig, pretrain

    out = tmp_path / "text-base"
    config = load_config(PretrainConfig, overrides=[
        *TINY_PRETRAIN, "training.steps=3", "training.batch_size=8", f"data.path={digits8}",
        "conditioning=text", f"output_dir={out}", "registered_model=ctrl-base-digits-text",
    ])
    result = pretrain(config, progress=False)
    base = load_base_model("models:/ctrl-base-digits-text/1")
    assert base.is_text_to_image and base.metadata["prompts"][7] == "a handwritten seven"
    backbone = build_backbone(base)
    assert backbone.prompt_states.shape == (10, 16, 384) and backbone.sample_shape == (1, 8, 8)
    grid = tmp_path / "seven.png"
    assert main(["sample", "--model", str(result.model_dir), "--prompt", "a handwritten seven",
                 "--guidance-scale", "3", "--n", "2", "--out", str(grid)]) == 0
    assert grid.is_file()
    frame = pd.DataFrame({"c": ["a handwritten seven", 7], "seed": [0, 0]})
    images = mlflow.pyfunc.load_model(result.model_uri).predict(frame)
    assert images.shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(images[0], images[1])  # the prompt is context 7


def test_a_guided_baseline_on_the_latent_model_is_scored_on_decoded_images(pipeline_dir):
    from ctrl_ray.baselines.cfg import CFGModel

    model = _policy(pipeline_dir).eval()
    contexts, labels = torch.tensor([0, 1]), {"compress_class": torch.tensor([0, 3])}
    guided, _ = generate(CFGModel(model, 1.0), contexts, labels, [3, 4], num_inference_steps=2)
    policy, _ = generate(model, contexts, labels, [3, 4], num_inference_steps=2)
    assert guided.shape == policy.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(guided.numpy(), policy.numpy(), atol=1e-4, rtol=0)


def test_baselines_on_the_latent_model_run_dps_and_refuse_cg_in_one_line(
        pipeline_dir, tiny_reward, digits8, tmp_path, capsys):
    common = ["--set", f"base_model={pipeline_dir}", "--set", "judge=", "--set",
              "evaluate_base=false", "--set", "evaluation.samples_per_target=1", "--set",
              "evaluation.contexts=[0, 1]", "--set", "evaluation.num_inference_steps=2"]
    configs = Path(__file__).parent.parent / "configs"
    assert main(["baseline", "dps", "--config", str(configs / "baseline_dps.yaml"), *common,
                 "--set", f"rewards=[{{path: {tiny_reward}}}]",
                 "--set", f"output_dir={tmp_path / 'dps'}"]) == 0
    report = json.loads((tmp_path / "dps" / "report.json").read_text())
    assert report["dps"]["num_samples"] == 4 * 2 and report["dps"]["mean_kl"] > 0.0
    capsys.readouterr()
    pairs = (f"pairs=[{{label: compress_class, num_pairs: 300, "
             f"path: {tiny_reward.parent}/pairs.parquet}}]")
    assert main(["baseline", "cg", "--config", str(configs / "baseline_cg.yaml"), *common,
                 "--set", f"dataset={digits8}", "--set", pairs,
                 "--set", f"output_dir={tmp_path / 'cg'}"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "baseline cg" in error[0] and "text-to-image" in error[0]
