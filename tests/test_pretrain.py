"""A tiny pre-train saves a diffusers directory, registers it, and loads back identically."""

from __future__ import annotations

import torch

from ctrl_ray.registry import load_base_model


def _noise_predictions(base):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 500, 999])
    c = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        return base.unet(x, t, class_labels=c).sample


def test_pretrain_saves_registers_and_loads_identically(tiny_base):
    assert tiny_base.model_uri == "models:/ctrl-base-digits/1"
    assert (tiny_base.model_dir / "unet" / "config.json").is_file()
    assert (tiny_base.model_dir / "scheduler" / "scheduler_config.json").is_file()
    assert tiny_base.final_loss < 0.5  # noise-prediction MSE starts near 1.0

    local = load_base_model(tiny_base.model_dir)
    registered = load_base_model("models:/ctrl-base-digits/1")
    assert registered.image_shape == (1, 8, 8)
    assert registered.num_contexts == 10
    torch.testing.assert_close(_noise_predictions(local), _noise_predictions(registered),
                               rtol=0, atol=0)
