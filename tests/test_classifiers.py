"""Reward classifier (calibration, gradients, storage, multi-task) and the digit fidelity judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from ctrl_ray.classifier_training import _augment_batch, train_classifier, train_digit_judge
from ctrl_ray.errors import InputError
from ctrl_ray.models.classifier import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ClassifierConfig,
    ImageClassifier,
    load_classifier,
    save_classifier,
)
from ctrl_ray.models.judge import DigitJudge
from ctrl_ray.models.reward import Reward, RewardTerm, load_reward
from ctrl_ray.reward_training import RewardTrainingConfig, train_reward

SIZE = 8


def quadrant_task(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 8x8 images whose label is the quadrant (0..3) that was brightened."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=count)
    images = rng.normal(-0.5, 0.35, size=(count, 1, SIZE, SIZE))
    half = SIZE // 2
    for index, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[index, 0, row * half:(row + 1) * half, col * half:(col + 1) * half] += 0.3
    return np.clip(images, -1, 1).astype(np.float32), labels.astype(np.int64)


@pytest.fixture(scope="module")
def quadrant_reward() -> tuple[RewardTerm, object]:
    images, labels = quadrant_task(400, seed=0)
    config = RewardTrainingConfig(epochs=12, batch_size=32, lr=3e-3, channels=(8, 16), seed=0)
    return train_reward(
        images, labels, num_classes=4, label_name="quadrant", edges=[0.5, 1.5, 2.5], config=config
    )


def random_reward(label_name: str, num_classes: int, seed: int, temperature: float) -> RewardTerm:
    torch.manual_seed(seed)
    classifier = ImageClassifier(ClassifierConfig(num_classes, SIZE, channels=(8, 16)))
    classifier.set_temperature(temperature)
    return RewardTerm(classifier, label_name)


def test_reward_learns_quadrants_and_calibration_does_not_hurt(quadrant_reward):
    reward, report = quadrant_reward
    assert report.val_accuracy > 0.9
    assert report.num_val == 80 and report.num_train == 320
    assert report.val_nll_calibrated <= report.val_nll_uncalibrated + 1e-6
    assert 0.0 <= report.ece_calibrated <= 1.0
    assert report.temperature == pytest.approx(reward.temperature)

    test_images, test_labels = quadrant_task(400, seed=1)
    x0 = torch.from_numpy(test_images)
    with torch.no_grad():
        calibrated = reward.log_probs(x0)
        uncalibrated = F.log_softmax(reward.classifier(x0), dim=1)
    labels = torch.from_numpy(test_labels)
    assert float((calibrated.argmax(1) == labels).float().mean()) > 0.9
    assert torch.allclose(calibrated.exp().sum(1), torch.ones(400), atol=1e-5)
    # On fresh data the fitted temperature should help, or at worst cost very little.
    assert float(F.nll_loss(calibrated, labels)) <= float(F.nll_loss(uncalibrated, labels)) + 0.02


def test_training_is_deterministic_given_the_seed():
    images, labels = quadrant_task(96, seed=3)
    kwargs = dict(num_classes=4, epochs=2, batch_size=32, seed=7, channels=(4, 8), augment=True)
    first, _ = train_classifier(images, labels, **kwargs)
    second, _ = train_classifier(images, labels, **kwargs)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    third, _ = train_classifier(images, labels, **{**kwargs, "seed": 8})
    assert not torch.equal(first.head.weight, third.head.weight)


def test_log_likelihood_is_differentiable_in_x0_only(quadrant_reward):
    reward = Reward([(quadrant_reward[0], 1.0)])  # one label: a reward with one term
    reward.train()
    assert not reward.training and not reward.terms[0].classifier.training
    assert all(not parameter.requires_grad for parameter in reward.parameters())

    images, labels = quadrant_task(6, seed=2)
    x0 = torch.from_numpy(images).requires_grad_(True)
    y = torch.from_numpy(labels)
    value = reward.log_likelihood(x0, y)
    assert value.shape == (6,)
    assert torch.all(value <= 0)
    value.sum().backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in reward.parameters())

    with torch.no_grad():
        expected = reward.terms[0].log_probs(x0)[torch.arange(6), y]
        assert torch.allclose(reward.log_likelihood(x0, {"quadrant": y}), expected)
        assert torch.allclose(reward.log_likelihood(x0, y, c=torch.zeros(6, dtype=torch.long)),
                              expected)


def test_reward_rejects_bad_labels(quadrant_reward):
    reward = Reward([(quadrant_reward[0], 1.0)])
    x0 = torch.zeros(2, 1, SIZE, SIZE)
    with pytest.raises(InputError, match="outside the classes 0..3"):
        reward.log_likelihood(x0, torch.tensor([0, 4]))
    with pytest.raises(InputError, match="unknown"):
        reward.log_likelihood(x0, {"quadrant": torch.tensor([0, 1]), "ink": torch.tensor([0, 1])})
    with pytest.raises(InputError, match="integer"):
        reward.log_likelihood(x0, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="images"):
        reward.log_likelihood(torch.zeros(2, 1, 16, 16), torch.tensor([0, 1]))


def test_training_rejects_bad_input():
    images, labels = quadrant_task(40, seed=4)
    nan_images = images.copy()
    nan_images[5, 0, 1, 1] = np.nan
    with pytest.raises(InputError, match="images: image 5"):
        train_classifier(nan_images, labels, num_classes=4, epochs=1)
    with pytest.raises(InputError, match="labels: value 4"):
        train_classifier(images, np.where(labels == 3, 4, labels), num_classes=4, epochs=1)
    with pytest.raises(InputError, match="labels: expected shape"):
        train_classifier(images, labels[:-1], num_classes=4, epochs=1)
    with pytest.raises(InputError, match="augment"):
        train_classifier(images, labels, num_classes=4, epochs=1, augment=["blur"])


def test_noise_augmentation_adds_zero_mean_noise_of_at_most_scale_0_3():
    images = torch.zeros(2000, 1, 4, 4)
    noisy = _augment_batch(images, ("noise",), torch.Generator().manual_seed(0))
    per_image_std = noisy.flatten(1).std(dim=1)
    assert abs(noisy.mean().item()) < 0.01
    assert per_image_std.max() < 0.3 * 2 and per_image_std.min() < 0.02  # scales span U(0, 0.3)
    assert abs(noisy.std().item() - 0.3 / 3**0.5) < 0.02  # E[scale^2] = 0.09 / 3


def test_save_load_round_trip_gives_identical_log_probs(quadrant_reward, tmp_path):
    reward, report = quadrant_reward
    target = tmp_path / "reward"
    reward.save(target)
    reward.save(target)  # overwriting an existing directory is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]
    loaded = RewardTerm.load(target)
    assert loaded.label_name == "quadrant"
    assert loaded.edges == [0.5, 1.5, 2.5]
    assert loaded.num_classes == 4
    assert loaded.temperature == pytest.approx(report.temperature)
    assert loaded.meta["report"]["val_accuracy"] == pytest.approx(report.val_accuracy)
    assert not any(parameter.requires_grad for parameter in loaded.parameters())
    x0 = torch.from_numpy(quadrant_task(16, seed=5)[0])
    with torch.no_grad():
        assert torch.equal(reward.log_probs(x0), loaded.log_probs(x0))
    # The one reward type reads a single-label directory as a reward with one term.
    single = load_reward(target)
    assert isinstance(single, Reward) and single.weights == [1.0]
    assert single.num_classes == {"quadrant": 4} and single.label_info()["quadrant"]["edges"]
    single.save(tmp_path / "again")
    assert RewardTerm.load(tmp_path / "again").label_name == "quadrant"


def test_context_conditional_classifier_round_trip(tmp_path):
    images, labels = quadrant_task(64, seed=6)
    contexts = np.arange(64) % 3
    model, _ = train_classifier(images, labels, num_classes=4, contexts=contexts, num_contexts=3,
                                epochs=1, channels=(4, 8), augment=False)
    x0 = torch.from_numpy(images[:4])
    with torch.no_grad():
        by_context = [model.log_probs(x0, torch.full((4,), c)) for c in range(3)]
    assert not torch.allclose(by_context[0], by_context[1])
    with pytest.raises(InputError, match="contexts"):
        model(x0)
    with pytest.raises(InputError, match="contexts: value 3"):
        model(x0, torch.full((4,), 3))
    save_classifier(model, 1.7, tmp_path / "clf", {"label_name": "quadrant"})
    loaded, meta = load_classifier(tmp_path / "clf")
    assert meta == {"label_name": "quadrant"} and float(loaded.temperature) == pytest.approx(1.7)
    with torch.no_grad():
        context = torch.full((4,), 2)
        expected = F.log_softmax(model(x0, context) / 1.7, dim=1)
        assert torch.allclose(loaded.log_probs(x0, context), expected, atol=1e-6)


def test_multitask_reward_is_the_weighted_sum(tmp_path):
    compress = random_reward("compress_class", 4, seed=0, temperature=1.3)
    ink = random_reward("ink_class", 3, seed=1, temperature=0.8)
    multi = Reward([(compress, 1.0), (ink, 0.5)])
    assert multi.label_names == ["compress_class", "ink_class"]
    assert multi.num_classes == {"compress_class": 4, "ink_class": 3}

    x0 = torch.randn(5, 1, SIZE, SIZE).clamp(-1, 1).requires_grad_(True)
    ys = {
        "compress_class": torch.tensor([0, 1, 2, 3, 0]),
        "ink_class": torch.tensor([2, 1, 0, 2, 1]),
    }
    total = multi.log_likelihood(x0, ys)
    expected = (compress.log_likelihood(x0, ys["compress_class"])
                + 0.5 * ink.log_likelihood(x0, ys["ink_class"]))
    assert torch.allclose(total, expected, atol=1e-6)
    # Decoded RGB images at twice the size: every term reads their luma at its own size.
    rgb = x0.detach().repeat(1, 3, 2, 2)
    assert multi.image_log_likelihood(rgb, ys).shape == (5,)
    assert torch.equal(multi.image_log_likelihood(x0, ys), total)
    total.sum().backward()
    assert torch.isfinite(x0.grad).all()
    with pytest.raises(InputError, match="missing"):
        multi.log_likelihood(x0, {"compress_class": ys["compress_class"]})
    with pytest.raises(InputError, match="unique"):
        Reward([(compress, 1.0), (compress, 1.0)])

    multi.save(tmp_path / "multi")
    loaded = load_reward(tmp_path / "multi")
    assert isinstance(loaded, Reward) and loaded.weights == [1.0, 0.5]
    with torch.no_grad():
        assert torch.equal(loaded.log_likelihood(x0, ys), multi.log_likelihood(x0, ys))


def real_digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """sklearn's 8x8 digits in [-1, 1] with a fixed 70/15/15 train/val/test split."""
    digits = load_digits()
    images = (digits.images[:, None] / 8.0 - 1.0).astype(np.float32)
    order = np.random.default_rng(123).permutation(len(images))
    cut_train, cut_val = int(0.70 * len(order)), int(0.85 * len(order))
    parts = {"train": order[:cut_train], "val": order[cut_train:cut_val], "test": order[cut_val:]}
    return {name: (images[index], digits.target[index]) for name, index in parts.items()}


def test_digit_judge_on_real_digits(tmp_path):
    split = real_digits_split()
    train_images = np.concatenate([split["train"][0], split["val"][0]])
    train_digits = np.concatenate([split["train"][1], split["val"][1]])
    judge, report = train_digit_judge(train_images, train_digits, seed=0, epochs=4,
                                      channels=(8, 16, 32), val_fraction=0.15 / 0.85)
    test_images, test_digits = split["test"]
    accuracy = judge.fidelity(test_images, test_digits)
    assert accuracy > 0.8
    assert report.val_accuracy > 0.8
    predicted = judge.predict(torch.from_numpy(test_images))
    assert predicted.dtype == np.int64 and predicted.shape == (len(test_digits),)
    assert judge.fidelity(test_images, (test_digits + 1) % 10) < 0.2

    judge.save(tmp_path / "judge")
    loaded = DigitJudge.load(tmp_path / "judge")
    assert np.array_equal(loaded.predict(test_images), judge.predict(test_images))
    with pytest.raises(InputError, match="trained on 8x8"):
        judge.predict(np.zeros((2, 1, 16, 16), dtype=np.float32))
    with pytest.raises(InputError, match="target_digits: value 10"):
        judge.fidelity(test_images[:2], [3, 10])
    with pytest.raises(InputError, match="not a reward model"):
        RewardTerm.load(tmp_path / "judge")


def test_loading_missing_or_corrupted_weights_raises_input_error(tmp_path):
    reward = random_reward("quadrant", 4, seed=2, temperature=1.0)
    good = reward.save(tmp_path / "good")

    with pytest.raises(InputError, match="does not exist"):
        load_classifier(tmp_path / "absent")

    missing = reward.save(tmp_path / "missing")
    (missing / WEIGHTS_FILE).unlink()
    with pytest.raises(InputError, match="is missing"):
        RewardTerm.load(missing)

    corrupted = reward.save(tmp_path / "corrupted")
    raw = (good / WEIGHTS_FILE).read_bytes()
    (corrupted / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="corrupted"):
        RewardTerm.load(corrupted)

    garbage = reward.save(tmp_path / "garbage")
    (garbage / WEIGHTS_FILE).write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(InputError, match="corrupted"):
        load_classifier(garbage)

    bad_config = reward.save(tmp_path / "bad_config")
    (bad_config / CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_classifier(bad_config)

    mismatched = reward.save(tmp_path / "mismatched")
    other = random_reward("quadrant", 3, seed=2, temperature=1.0)
    other.save(tmp_path / "other")
    (mismatched / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="shape"):
        load_classifier(mismatched)


def test_scorers_oracle_labeller_and_missing_judge(tmp_path):
    """Every label's samples are labelled by its scorer; a bad labeller or a missing judge is
    one clear InputError."""
    from ctrl_ray.data.oracles import label_images
    from ctrl_ray.scoring import get_scorer, label_images_for

    images = np.random.default_rng(0).uniform(-1, 1, (6, 1, 8, 8)).astype(np.float32)
    info = {"num_classes": 4, "edges": [0.4, 0.5, 0.6]}
    expected = label_images(images, "ink_class", info["edges"])
    assert get_scorer("ink_class", info).kind == "oracle"
    np.testing.assert_array_equal(label_images_for(images, "ink_class", info), expected)
    rgb = np.repeat(images, 3, axis=1)  # an RGB image is seen by the oracle as its luma
    np.testing.assert_allclose(label_images_for(rgb, "ink_class", info), expected)

    (tmp_path / "mine.py").write_text(
        "import numpy as np\n"
        "def names(x):\n    return np.where(x.mean(axis=(1, 2, 3)) > 0, 'b', 'a')\n"
        "def wrong(x):\n    return np.full(len(x), 5)\n"
        "def short(x):\n    return np.zeros(2, int)\n")
    own = {"num_classes": 2, "edges": [], "class_names": ["a", "b"]}
    got = label_images_for(images, "own", own, override=f"{tmp_path}/mine.py:names")
    np.testing.assert_array_equal(got, (images.mean(axis=(1, 2, 3)) > 0).astype(int))
    for function, message in (("wrong", "returned class 5"), ("short", r"returned shape \(2,\)"),
                              ("absent", "has no function 'absent'")):
        with pytest.raises(InputError, match=message):
            label_images_for(images, "own", own, override=f"{tmp_path}/mine.py:{function}")
    with pytest.raises(InputError, match="no built-in oracle and no judge or labeller"):
        get_scorer("own", own)
    gone = {**own, "scorer": {"kind": "judge", "path": str(tmp_path / "gone")}}
    with pytest.raises(InputError, match="judge directory .* is missing"):
        get_scorer("own", gone)
