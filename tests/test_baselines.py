"""The baselines (CFG, classifier guidance, DPS) end to end on the tiny 8x8 testbed.

The target is ink (mean intensity, 4 quantile classes): an exact oracle that guidance can move
at 8x8 in a few steps, so "the guided samples hit the requested class more often than the
base model's samples on the same seeds" is a robust check of each baseline's direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from ctrl_ray.baselines.cfg import CFGModel, build_triplets
from ctrl_ray.baselines.classifier_guidance import (
    ClassifierGuidedModel,
    NoisyClassifier,
    NoisyClassifierTrainingConfig,
    train_noisy_classifier,
)
from ctrl_ray.baselines.dps import DPSModel
from ctrl_ray.baselines.run import (
    BASELINE_CONFIGS,
    CFGBaselineConfig,
    load_baseline_config,
    run_baseline,
)
from ctrl_ray.config import load_config
from ctrl_ray.data.digits import load_digits_dataset
from ctrl_ray.data.pairs import load_pairs, make_pairs
from ctrl_ray.errors import InputError
from ctrl_ray.evaluation import generate
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.policy import load_any
from ctrl_ray.registry import load_base_model

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(scope="module")
def ink(digits8, tmp_path_factory):
    """300 ink pairs from the 8x8 train split and a reward trained on them (a few epochs)."""
    from ctrl_ray.reward_training import RewardJobConfig, train_reward_job

    root = tmp_path_factory.mktemp("ink")
    config = load_config(RewardJobConfig, overrides=[
        f"dataset={digits8}", "size=8", "label=ink_class", "num_pairs=300",
        f"pairs={root}/pairs.parquet", "training.epochs=5", f"output_dir={root}/reward",
    ])
    train_reward_job(config, progress=False)
    return root


def overrides(kind, tiny_base, tiny_judge, digits8, ink, out, scale) -> list[str]:
    common = [f"base_model={tiny_base.model_dir}", f"judge={tiny_judge}",
              f"guidance_scale={scale}", "evaluation.samples_per_target=4",
              "evaluation.contexts=[0, 1, 2, 3]", "evaluation.num_inference_steps=4",
              f"output_dir={out}"]
    pairs = [f"dataset={digits8}",
             f"pairs=[{{label: ink_class, num_pairs: 300, path: {ink}/pairs.parquet}}]"]
    return common + {
        "cfg": pairs + ["training.steps=100", "training.batch_size=16",
                        "training.lr_embedding=0.05", "training.lr_adapter=0.005"],
        "cg": pairs + ["training.steps=300", "training.batch_size=32"],
        "dps": [f"rewards=[{{path: {ink}/reward}}]"],
    }[kind]


@pytest.mark.parametrize("kind, scale", [("cfg", 5.0), ("cg", 10.0), ("dps", 10.0)])
def test_baseline_beats_the_base_model_on_the_same_seeds(kind, scale, tiny_base, tiny_judge,
                                                         digits8, ink, tmp_path):
    config = load_baseline_config(kind, None, overrides(kind, tiny_base, tiny_judge, digits8,
                                                        ink, tmp_path / kind, scale))
    result = run_baseline(kind, config, progress=False)

    guided, base = result[kind], result["base"]
    assert guided["num_samples"] == base["num_samples"] == 4 * 4 * 4
    assert guided["accuracy"] >= base["accuracy"] + 0.08, (guided["accuracy"], base["accuracy"])
    assert guided["macro_f1"] > base["macro_f1"]
    assert guided["mean_kl"] > 0.0 and base["mean_kl"] == 0.0
    scores = guided["labels"]["ink_class"]
    assert len(scores["per_class_f1"]) == 4 and np.sum(scores["confusion_matrix"]) == 64
    assert 0.0 <= guided["fidelity"] <= 1.0
    assert (tmp_path / kind / f"{kind}_grid.png").is_file()
    report = json.loads((tmp_path / kind / "report.json").read_text())
    assert report[kind]["accuracy"] == guided["accuracy"]

    run = mlflow.get_run(result["mlflow_run_id"])
    assert run.data.params["kind"] == kind
    assert run.data.metrics[f"eval_{kind}_accuracy"] == pytest.approx(guided["accuracy"])
    assert run.data.metrics["train_seconds"] >= 0.0
    if kind == "cfg":  # the trained conditional network is a regular policy checkpoint
        loaded = load_any(result["training"]["model_dir"])
        assert loaded.fine_tuned and loaded.model.label_classes == {"ink_class": 4}
        assert result["label_counts"] == {"y": {"ink_class": 300}, "c": 300}
    if kind == "cg":
        path = result["training"]["ink_class"]["model_dir"]
        assert NoisyClassifier.load(path).num_classes == 4


def test_zero_guidance_reproduces_the_base_model(tiny_base, ink):
    """With scale 0 CG and DPS sample exactly the pre-trained model (and a KL of zero)."""
    from ctrl_ray.models.reward import load_reward

    base = load_base_model(tiny_base.model_dir)
    model = AugmentedModel(UNetBackbone(base.unet, base.scheduler), {}, adapter="none").eval()
    labels = {"ink_class": torch.tensor([0, 3, 1])}
    contexts, seeds = torch.tensor([1, 2, 3]), [5, 6, 7]
    reference, _ = generate(DPSModel(model, load_reward(ink / "reward"), 0.0), contexts, labels,
                            seeds, num_inference_steps=4, from_reference=True)
    dps, kl = generate(DPSModel(model, load_reward(ink / "reward"), 0.0), contexts, labels,
                       seeds, num_inference_steps=4, compute_kl=True)
    torch.testing.assert_close(dps, reference, atol=1e-6, rtol=0)
    assert float(kl.abs().max()) < 1e-6
    pairs = load_pairs(ink / "pairs.parquet")
    classifier, _ = train_noisy_classifier(
        pairs.images[:32], pairs.labels[:32], model.alphas_cumprod, num_classes=4,
        label_name="ink_class", config=NoisyClassifierTrainingConfig(steps=5, batch_size=8))
    guided = ClassifierGuidedModel(model, [classifier], 0.0)
    cg, _ = generate(guided, contexts, labels, seeds, num_inference_steps=4)
    torch.testing.assert_close(cg, reference, atol=1e-6, rtol=0)
    # the null label K switches guidance off row by row, whatever the scale
    null = {"ink_class": torch.tensor([4, 4, 4])}
    strong = DPSModel(model, load_reward(ink / "reward"), 50.0)
    unguided, _ = generate(strong, contexts, null, seeds, num_inference_steps=4)
    torch.testing.assert_close(unguided, reference, atol=1e-6, rtol=0)


def test_triplets_look_up_the_digit_and_null_the_other_labels(digits8, tmp_path):
    dataset = load_digits_dataset(digits8)
    ink_pairs = load_pairs(make_pairs(digits8, "ink_class", 20, tmp_path / "ink.parquet", seed=1))
    compress = load_pairs(make_pairs(digits8, "compress_class", 10, tmp_path / "c.parquet",
                                     seed=2))
    triplets = build_triplets([ink_pairs, compress], dataset)
    assert len(triplets) == 30 and triplets.label_classes == {"ink_class": 4, "compress_class": 4}
    assert triplets.label_counts() == {"ink_class": 20, "compress_class": 10}
    assert torch.all(triplets.labels["compress_class"][:20] == 4)
    assert torch.all(triplets.labels["ink_class"][20:] == 4)
    # the digits are those of the very rows make_pairs drew (same seed, same rows)
    train = dataset.subset("train")
    rows = np.random.default_rng(1).choice(len(train), size=20, replace=False)
    assert triplets.contexts[:20].tolist() == train.digits[rows].tolist()
    stranger = ink_pairs.images.copy()
    stranger[0] = 0.123
    ink_pairs.images = stranger
    with pytest.raises(InputError, match="not in the train split"):
        build_triplets([ink_pairs], dataset)


def test_cfg_guidance_is_an_extrapolation_of_the_two_predictions(tiny_base):
    base = load_base_model(tiny_base.model_dir)
    model = AugmentedModel(UNetBackbone(base.unet, base.scheduler), {"ink_class": 4}).eval()
    with torch.no_grad():
        model.label_embeddings["ink_class"].weight[:4].normal_()
        x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
        y = {"ink_class": torch.tensor([0, 2, 4])}
        conditional = model.predict_noise(x, t, c, y)
        unconditional = model.predict_noise(x, t, c, {"ink_class": torch.full((3,), 4)})
        guided = CFGModel(model, 3.0).predict_noise(x, t, c, y)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[2], unconditional[2])  # the null row is unguided


@pytest.mark.parametrize("kind", ["cfg", "cg", "dps"])
def test_shipped_configs_load_and_bad_values_are_input_errors(kind):
    config = load_baseline_config(kind, CONFIGS / f"baseline_{kind}.yaml")
    assert isinstance(config, BASELINE_CONFIGS[kind]) and config.guidance_scale > 0
    with pytest.raises(InputError, match="unknown config key"):
        load_baseline_config(kind, None, ["no_such_key=1"])


def test_bad_kind_and_bad_values_are_input_errors(tiny_base, digits8, ink):
    with pytest.raises(InputError, match="baseline kind"):
        load_baseline_config("ppo")
    with pytest.raises(InputError, match="guidance_scale"):
        load_baseline_config("cg", None, ["guidance_scale=-1"])
    with pytest.raises(InputError, match="p_uncond"):
        load_baseline_config("cfg", None, ["training.p_uncond=1.5"])
    with pytest.raises(InputError, match="CFGBaselineConfig"):
        run_baseline("cfg", load_baseline_config("dps"))
    wrong_label = load_config(CFGBaselineConfig, overrides=[
        f"base_model={tiny_base.model_dir}", f"dataset={digits8}",
        f"pairs=[{{label: compress_class, num_pairs: 300, path: {ink}/pairs.parquet}}]"])
    with pytest.raises(InputError, match=r"pairs\[0\]\.label"):
        run_baseline("cfg", wrong_label, progress=False)
