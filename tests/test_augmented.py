"""The augmented model starts as the pre-trained one, keeps it as reference, saves only its own."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.unet import ScheduleConfig, UNetConfig, build_scheduler, build_unet

BATCH = 4
LABELS = {"compress_class": 4, "ink_class": 3}




def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return build_unet(UNetConfig(image_size=8, block_out_channels=(16, 32)))


def tiny_scheduler():
    return build_scheduler(ScheduleConfig(num_train_timesteps=100))


def make_model(adapter: str, unet=None, lora_rank: int = 4) -> AugmentedModel:
    unet = unet if unet is not None else tiny_unet()
    return AugmentedModel(UNetBackbone(unet, tiny_scheduler()), LABELS, adapter=adapter,
                          lora_rank=lora_rank)


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(BATCH, 1, 8, 8, generator=generator)
    t = torch.randint(0, 100, (BATCH,), generator=generator)
    contexts = torch.randint(0, 10, (BATCH,), generator=generator)
    labels = {"compress_class": torch.tensor([0, 1, 3, 4]), "ink_class": torch.tensor([2, 3, 0, 1])}
    return x_t, t, contexts, labels


def perturb(model: AugmentedModel, seed: int = 2) -> None:
    """Move every trainable tensor away from its initial value (null rows stay zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        for embedding in model.label_embeddings.values():
            embedding.weight[-1].zero_()


def pretrained_noise(unet, x_t, t, contexts):
    with torch.no_grad():
        return unet(x_t, t, class_labels=contexts).sample


@pytest.mark.parametrize("adapter", ["lora", "full", "none"])
def test_augmented_model_equals_pretrained_at_init(adapter):
    reference_unet = tiny_unet()
    model = make_model(adapter)
    x_t, t, contexts, labels = batch()
    with torch.no_grad():
        augmented = model.predict_noise(x_t, t, contexts, labels)
    assert (augmented - pretrained_noise(reference_unet, x_t, t, contexts)).abs().max() <= 1e-6


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_reference_is_the_pretrained_model_after_the_adapter_moved(adapter):
    reference_unet = tiny_unet()
    model = make_model(adapter)
    perturb(model)
    x_t, t, contexts, labels = batch()
    expected = pretrained_noise(reference_unet, x_t, t, contexts)
    with torch.no_grad():
        policy = model.predict_noise(x_t, t, contexts, labels)
        reference = model.reference_noise(x_t, t, contexts)
        with model.reference():
            inside_block = model.predict_noise(x_t, t, contexts, labels)
        policy_again = model.predict_noise(x_t, t, contexts, labels)
    assert (policy - expected).abs().max() > 1e-3
    assert (reference - expected).abs().max() <= 1e-6
    assert (inside_block - expected).abs().max() <= 1e-6
    assert torch.equal(policy, policy_again)
    # toggling the adapters must not change which parameters train
    groups = model.trainable_parameter_groups().values()
    assert all(p.requires_grad for group in groups for p in group)


def test_reference_is_differentiable_in_the_input_but_not_the_weights():
    model = make_model("lora")
    perturb(model)
    x_t, t, contexts, _ = batch()
    x_t.requires_grad_(True)
    model.reference_noise(x_t, t, contexts).square().sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_label_embeddings_of_several_labels_add_up():
    model = make_model("none")
    perturb(model)
    x_t, t, contexts, labels = batch()
    extra = (model.label_embeddings["compress_class"](labels["compress_class"])
             + model.label_embeddings["ink_class"](labels["ink_class"]))
    with torch.no_grad():
        expected = model.backbone.predict_noise(x_t, t, contexts, extra)
        got = model.predict_noise(x_t, t, contexts, labels)
        null_labels = {"compress_class": torch.full((BATCH,), 4)}
        only_null = model.predict_noise(x_t, t, contexts, null_labels)
        reference = model.reference_noise(x_t, t, contexts)
    assert torch.equal(got, expected)
    assert torch.equal(only_null, reference)


def test_trainable_state_dict_holds_only_lora_and_embeddings():
    model = make_model("lora")
    state = model.trainable_state_dict()
    lora_names = [name for name in state if ".lora_" in name]
    assert sorted(set(state) - set(lora_names)) == [
        "label_embeddings.compress_class.weight", "label_embeddings.ink_class.weight"
    ]
    assert lora_names and all(name.startswith("backbone.network.") for name in lora_names)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(state)
    assert sum(v.numel() for v in state.values()) == model.num_trainable_parameters()
    groups = model.trainable_parameter_groups()
    assert len(groups["embedding"]) == 2 and len(groups["adapter"]) == len(lora_names)
    targeted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora_names}
    assert {"conv1", "conv2", "to_q", "to_k", "to_v", "0"} <= targeted


def test_null_label_row_stays_zero_after_an_optimizer_step():
    model = make_model("lora")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x_t, t, contexts, labels = batch()
    for _ in range(2):
        optimizer.zero_grad()
        model.predict_noise(x_t, t, contexts, labels).square().mean().backward()
        optimizer.step()
    for name, num_classes in LABELS.items():
        weight = model.label_embeddings[name].weight
        assert torch.all(weight[num_classes] == 0), name
        used = labels[name][labels[name] < num_classes]
        assert torch.all(weight[used].abs().sum(1) > 0), name


def test_trainable_state_round_trips_through_safetensors(tmp_path):
    unet = tiny_unet()
    model = make_model("lora", unet=copy.deepcopy(unet))
    perturb(model)
    save_file(model.trainable_state_dict(), tmp_path / "adapter.safetensors")

    restored = make_model("lora", unet=copy.deepcopy(unet))
    restored.load_trainable_state_dict(load_file(tmp_path / "adapter.safetensors"))
    x_t, t, contexts, labels = batch()
    with torch.no_grad():
        assert torch.equal(
            model.predict_noise(x_t, t, contexts, labels),
            restored.predict_noise(x_t, t, contexts, labels),
        )


def test_loading_a_state_dict_that_does_not_fit_is_refused():
    model = make_model("lora", lora_rank=4)
    other = make_model("lora", lora_rank=8).trainable_state_dict()
    with pytest.raises(InputError, match="shape"):
        model.load_trainable_state_dict(other)
    state = model.trainable_state_dict()
    state.pop("label_embeddings.ink_class.weight")
    with pytest.raises(InputError, match="ink_class"):
        model.load_trainable_state_dict(state)
    state = model.trainable_state_dict()
    state["label_embeddings.ink_class.weight"][-1] = 1.0
    with pytest.raises(InputError, match="null"):
        model.load_trainable_state_dict(state)


def test_bad_arguments_name_the_field():
    with pytest.raises(InputError, match="adapter"):
        make_model("dora")
    with pytest.raises(InputError, match="label_classes"):
        AugmentedModel(UNetBackbone(tiny_unet(), tiny_scheduler()), {"y": 0})
    model = make_model("none")
    with pytest.raises(InputError, match="compress_class"):
        model.validate_labels({"compress_class": torch.tensor([0, 5, 1, 2])}, BATCH)


def test_a_cross_attention_unet_fits_the_same_interface():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        norm_num_groups=8, attention_head_dim=8,
    )
    base = copy.deepcopy(unet)
    model = AugmentedModel(UNetBackbone(unet, tiny_scheduler()), {"y": 2}, adapter="lora")
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 90])
    prompts = torch.randn(2, 3, 8)
    labels = {"y": torch.tensor([0, 1])}
    with torch.no_grad():
        expected = base(x_t, t, encoder_hidden_states=prompts).sample
        assert (model.predict_noise(x_t, t, prompts, labels) - expected).abs().max() <= 1e-6
        perturb(model)
        assert (model.predict_noise(x_t, t, prompts, labels) - expected).abs().max() > 1e-3
        assert (model.reference_noise(x_t, t, prompts) - expected).abs().max() <= 1e-6
    assert model.sample_shape == (4, 8, 8) and model.num_contexts is None


def test_min_timestep_gates_the_new_parameters_per_row():
    reference_unet = tiny_unet()
    model = AugmentedModel(UNetBackbone(tiny_unet(), tiny_scheduler()), LABELS, adapter="lora",
                           min_timestep=50)
    perturb(model)
    x_t, _, contexts, labels = batch()
    t = torch.tensor([10, 49, 50, 90])
    expected = pretrained_noise(reference_unet, x_t, t, contexts)
    x_t.requires_grad_(True)
    policy = model.predict_noise(x_t, t, contexts, labels)
    difference = (policy - expected).detach().abs().flatten(1).amax(1)
    assert difference[:2].max() <= 1e-6  # below min_timestep: exactly the pre-trained model
    assert difference[2:].min() > 1e-3
    policy[2:].sum().backward()
    assert x_t.grad[2:].abs().sum() > 0
    low = model.predict_noise(x_t[:2], torch.tensor([0, 1]), contexts[:2], {
        name: values[:2] for name, values in labels.items()})
    assert (low - pretrained_noise(reference_unet, x_t[:2].detach(), torch.tensor([0, 1]),
                                   contexts[:2])).abs().max() <= 1e-6
    with pytest.raises(InputError, match="min_timestep"):
        AugmentedModel(UNetBackbone(tiny_unet(), tiny_scheduler()), LABELS, min_timestep=-1)


def test_time_buckets_give_each_band_of_timesteps_its_own_label_vector():
    # 100 training timesteps in 4 buckets: t in [0, 25), [25, 50), [50, 75), [75, 100).
    model = AugmentedModel(UNetBackbone(tiny_unet(), tiny_scheduler()), LABELS, adapter="none",
                           time_buckets=4)
    x_t, _, contexts, labels = batch()
    t = torch.tensor([10, 30, 60, 99])
    before = model.predict_noise(x_t, t, contexts, labels).detach()
    assert (before - pretrained_noise(tiny_unet(), x_t, t, contexts)).abs().max() <= 1e-6
    with torch.no_grad():  # move class vectors of the third bucket only
        for embedding in model.label_embeddings.values():
            dim = embedding.weight.shape[1] // 4
            embedding.weight[:-1, 2 * dim:3 * dim] += 1.0
    after = model.predict_noise(x_t, t, contexts, labels).detach()
    changed = (after - before).abs().flatten(1).amax(1)
    assert changed[2] > 1e-3 and changed[[0, 1, 3]].max() <= 1e-6
    state = model.trainable_state_dict()
    assert state["label_embeddings.ink_class.weight"].shape[1] == 4 * dim
    with pytest.raises(InputError, match="time_buckets"):
        AugmentedModel(UNetBackbone(tiny_unet(), tiny_scheduler()), LABELS, time_buckets=0)


def test_a_backbone_leaves_no_hook_on_its_unet():
    """Two backbones built on one UNet (a discarded one included) do not stack hooks: the
    extra embedding is added only during a call that carries one, by the backbone making it."""
    unet = tiny_unet()
    discarded = UNetBackbone(unet, tiny_scheduler())
    backbone = UNetBackbone(unet, tiny_scheduler())
    x_t, t, contexts, _ = batch()
    extra = torch.randn(BATCH, backbone.embedding_dim)
    with torch.no_grad():
        plain = backbone.predict_noise(x_t, t, contexts)
        shifted = backbone.predict_noise(x_t, t, contexts, extra)
        assert (discarded.predict_noise(x_t, t, contexts, extra) - shifted).abs().max() == 0
        assert (plain - pretrained_noise(unet, x_t, t, contexts)).abs().max() == 0
    assert (shifted - plain).abs().max() > 1e-3
    assert len(unet.time_embedding._forward_hooks) == 0
