"""The sampler: its steps are DDIM/DDPM, its KL is the Gaussian KL, its gradients are right."""

import copy
from functools import partial

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from ctrl_ray.errors import InputError
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.backbone import UNetBackbone
from ctrl_ray.models.gaussian_mixture import GaussianMixtureBackbone
from ctrl_ray.models.unet import ScheduleConfig, UNetConfig, build_scheduler, build_unet
from ctrl_ray.objectives.pathwise import PathwiseConfig, draw_inputs, pathwise_loss
from ctrl_ray.sampling import (
    DenoisingSchedule,
    RolloutInputs,
    Truncation,
    gaussian_kl,
    sample,
    step_mean,
)

T = 100
STEPS = 5
BATCH = 4
LABELS = {"compress_class": 4}




@pytest.fixture(scope="module")
def pretrained_unet():
    torch.manual_seed(0)
    return build_unet(UNetConfig(image_size=8, block_out_channels=(16, 32)))


def make_model(unet, perturbed: bool, adapter: str = "lora", dtype=torch.float32) -> AugmentedModel:
    """The tiny UNet, augmented; float64 where gradients are compared exactly."""
    scheduler = build_scheduler(ScheduleConfig(num_train_timesteps=T))
    model = AugmentedModel(UNetBackbone(copy.deepcopy(unet), scheduler), LABELS, adapter=adapter)
    model.to(dtype)
    if perturbed:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for parameter in (p for p in model.parameters() if p.requires_grad):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
            model.label_embeddings["compress_class"].weight[-1].zero_()
    return model


def make_inputs(seed: int = 0, batch: int = BATCH, steps: int = STEPS) -> RolloutInputs:
    return RolloutInputs.draw(seed, batch, steps, (1, 8, 8), LABELS, num_contexts=10)


def label_reward(x0, labels, contexts):
    """A differentiable log-likelihood stand-in: pixels near a label-dependent target."""
    target = labels["compress_class"].float()[:, None, None, None] / 2 - 0.75
    return -(x0 - target).square().flatten(1).sum(1)


def trainable_grads(model):
    return {name: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    trajectory = sample(model, inputs, differentiable=True, **kwargs)
    reward = label_reward(trajectory.x0, inputs.labels, inputs.contexts)
    loss = (-reward + trajectory.path_kl).mean()
    loss.backward()
    return loss.detach(), trainable_grads(model)


def assert_same_grads(first, second):
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_every_step_kl_is_zero_at_init(pretrained_unet):
    trajectory = sample(make_model(pretrained_unet, perturbed=False), make_inputs())
    assert trajectory.kl.shape == (STEPS, BATCH)
    assert torch.all(trajectory.kl == 0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_step_kl_and_log_prob_are_those_of_the_two_gaussians(pretrained_unet, reduction):
    model = make_model(pretrained_unet, perturbed=True)
    inputs = make_inputs()
    trajectory = sample(model, inputs, kl_reduction=reduction, compute_log_ratio=True)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, STEPS, eta=1.0)
    assert torch.all(trajectory.sigmas > 0)
    assert trajectory.kl.min() > 0
    with torch.no_grad():
        for step in range(STEPS):
            x_t, sigma = trajectory.states[step], trajectory.sigmas[step]
            policy = partial(model.predict_noise, labels=inputs.labels)
            policy_mean = step_mean(schedule, step, policy, x_t, inputs.contexts, True)
            reference_mean = step_mean(schedule, step, model.reference_noise, x_t,
                                       inputs.contexts, True)
            torch.testing.assert_close(policy_mean, trajectory.means[step])
            per_dim = kl_divergence(Normal(policy_mean, sigma), Normal(reference_mean, sigma))
            per_dim = per_dim.flatten(1)
            expected = per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)
            torch.testing.assert_close(trajectory.kl[step], expected, rtol=1e-4, atol=1e-7)
            log_prob = Normal(policy_mean, sigma).log_prob(trajectory.states[step + 1]).flatten(1)
            torch.testing.assert_close(trajectory.log_probs[step], log_prob.sum(1))
            log_ratio = log_prob.sum(1) - Normal(reference_mean, sigma).log_prob(
                trajectory.states[step + 1]).flatten(1).sum(1)
            torch.testing.assert_close(trajectory.log_ratio[step], log_ratio, rtol=1e-4,
                                       atol=1e-3)


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_steps_match_the_diffusers_ddim_scheduler(pretrained_unet, eta):
    model = make_model(pretrained_unet, perturbed=False)
    inputs = make_inputs()
    trajectory = sample(model, inputs, eta=eta, compute_kl=eta > 0)
    scheduler = DDIMScheduler(
        num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=True,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    scheduler.set_timesteps(STEPS)
    assert torch.equal(scheduler.timesteps, trajectory.timesteps)
    x = inputs.initial_noise
    with torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            noise = pretrained_unet(x, t, class_labels=inputs.contexts).sample
            x = scheduler.step(noise, t, x, eta=eta, use_clipped_model_output=True,
                               variance_noise=inputs.step_noise[step]).prev_sample
            torch.testing.assert_close(trajectory.states[step + 1], x, rtol=1e-4, atol=1e-5)


def test_ddim_with_eta_one_is_ddpm_ancestral():
    alphas_cumprod = build_scheduler(ScheduleConfig(num_train_timesteps=1000)).alphas_cumprod
    schedule = DenoisingSchedule.create(alphas_cumprod, 20, eta=1.0)
    x_t, noise = torch.randn(3, 2), torch.randn(3, 2)
    for step in range(20):
        alpha, alpha_prev = schedule.alphas[step].double(), schedule.alphas_prev[step].double()
        beta = 1 - alpha / alpha_prev
        x0 = (x_t - (1 - alpha).sqrt() * noise) / alpha.sqrt()
        posterior_mean = (alpha_prev.sqrt() * beta / (1 - alpha)) * x0 + (
            (1 - beta).sqrt() * (1 - alpha_prev) / (1 - alpha)
        ) * x_t
        posterior_variance = beta * (1 - alpha_prev) / (1 - alpha)
        mean = schedule.mean(step, x_t, noise, clip_sample=False)
        torch.testing.assert_close(mean, posterior_mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(schedule.sigmas[step] ** 2, posterior_variance.float())


def test_ddpm_method_is_ddim_with_eta_one(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True)
    inputs = make_inputs()
    ddpm = sample(model, inputs, method="ddpm")
    ddim = sample(model, inputs, eta=1.0)
    assert torch.equal(ddpm.x0, ddim.x0) and torch.equal(ddpm.kl, ddim.kl)
    with pytest.raises(InputError, match="eta"):
        sample(model, inputs, method="ddpm", eta=0.5)


def test_ddim_with_eta_zero_is_deterministic_given_the_initial_noise(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True)
    first, second = make_inputs(seed=0), make_inputs(seed=1)
    second.initial_noise = first.initial_noise.clone()
    second.labels, second.contexts = first.labels, first.contexts
    a = sample(model, first, eta=0.0, compute_kl=False)
    b = sample(model, second, eta=0.0, compute_kl=False)
    c = sample(model, first, eta=1.0, compute_kl=False)
    assert torch.equal(a.x0, b.x0)
    assert not torch.allclose(a.x0, c.x0)
    assert a.log_probs is None and a.kl is None
    with pytest.raises(InputError, match="eta"):
        sample(model, first, eta=0.0)


def test_rollout_mode_needs_no_graph_and_skips_the_reference_without_kl(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True)
    calls = []
    model.backbone.network.register_forward_hook(
        lambda module, args, output: calls.append(torch.is_grad_enabled())
    )
    without_kl = sample(model, make_inputs(), compute_kl=False)
    assert len(calls) == STEPS and not any(calls)
    assert without_kl.kl is None and not without_kl.x0.requires_grad
    calls.clear()
    with_kl = sample(model, make_inputs())
    assert len(calls) == 2 * STEPS and not any(calls)
    assert torch.equal(with_kl.x0, without_kl.x0)
    calls.clear()
    base = sample(model, make_inputs(), from_reference=True)
    assert len(calls) == STEPS and base.kl is None
    assert not torch.allclose(base.x0, with_kl.x0)


def test_gradients_reach_the_label_embedding_and_the_adapters(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=False)
    inputs = make_inputs()
    inputs.labels["compress_class"] = torch.tensor([0, 1, 2, 4])
    _, grads = loss_and_grads(model, inputs, checkpoint=False)
    embedding = grads["label_embeddings.compress_class.weight"]
    assert torch.all(embedding[[0, 1, 2]].abs().sum(1) > 0)
    assert torch.all(embedding[[3, 4]] == 0)  # class 3 unused; row 4 is the null label
    lora_up = [g for name, g in grads.items() if ".lora_B." in name]
    assert lora_up and all(g.abs().sum() > 0 for g in lora_up)


def test_truncation_gives_no_parameter_gradient_from_steps_before_the_window(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True, dtype=torch.float64)
    inputs = make_inputs().to("cpu", torch.float64)
    window = 2
    loss, truncated = loss_and_grads(model, inputs, gradient_steps=window, checkpoint=False)
    _, untruncated = loss_and_grads(model, inputs, checkpoint=False)

    # The same loss by hand: the no-grad chain up to the window, then `window` steps with grad.
    model.zero_grad(set_to_none=True)
    trajectory = sample(model, inputs)
    schedule = DenoisingSchedule.create(model.alphas_cumprod, STEPS, eta=1.0)
    path_kl = trajectory.kl[: STEPS - window].sum(0)
    x = trajectory.states[STEPS - window]
    for step in range(STEPS - window, STEPS):
        t = trajectory.timesteps[step].expand(BATCH)
        policy = model.predict_noise(x, t, inputs.contexts, inputs.labels)
        reference = model.reference_noise(x, t, inputs.contexts)
        mean = schedule.mean(step, x, policy, clip_sample=True)
        reference_mean = schedule.mean(step, x, reference, clip_sample=True)
        path_kl = path_kl + gaussian_kl(mean, reference_mean, schedule.sigmas[step])
        x = mean + schedule.sigmas[step] * inputs.step_noise[step]
    by_hand = (-label_reward(x, inputs.labels, inputs.contexts) + path_kl).mean()
    by_hand.backward()

    torch.testing.assert_close(loss, by_hand.detach(), rtol=1e-12, atol=0)
    assert_same_grads(truncated, trainable_grads(model))
    differs = [name for name in truncated
               if not torch.allclose(truncated[name], untruncated[name], rtol=1e-3, atol=1e-6)]
    assert differs, "the window must cut the gradient of the earlier steps"


def test_the_window_counts_only_steps_above_min_timestep(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True, dtype=torch.float64)
    inputs = make_inputs().to("cpu", torch.float64)
    timesteps = DenoisingSchedule.create(model.alphas_cumprod, STEPS, eta=1.0).timesteps
    model.min_timestep = int(timesteps[-2])  # the last step is the pre-trained network
    _, gated = loss_and_grads(model, inputs, gradient_steps=1, checkpoint=False)
    assert any(g.abs().sum() > 0 for g in gated.values())
    # A window of all STEPS - 1 adapted steps is the whole chain (the gated step passed through).
    _, all_adapted = loss_and_grads(model, inputs, gradient_steps=STEPS - 1, checkpoint=False)
    _, untruncated = loss_and_grads(model, inputs, checkpoint=False)
    assert_same_grads(all_adapted, untruncated)
    trajectory = sample(model, inputs)
    assert torch.all(trajectory.kl[-1] == 0) and torch.all(trajectory.kl[-2] > 0)
    model.min_timestep = int(timesteps[0]) + 1
    with pytest.raises(InputError, match="min_timestep"):
        sample(model, inputs, differentiable=True)


def test_random_truncation_draws_every_window_in_range():
    truncation = Truncation("random", k=3)
    generator = torch.Generator().manual_seed(0)
    windows = {truncation.gradient_steps(STEPS, generator) for _ in range(100)}
    assert windows == {1, 2, 3}
    assert Truncation("fixed", k=9).gradient_steps(STEPS) == STEPS
    with pytest.raises(InputError, match="truncation.mode"):
        Truncation("sometimes", k=2)


def test_checkpointing_changes_no_gradient(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=True, dtype=torch.float64)
    inputs = make_inputs()
    loss_plain, plain = loss_and_grads(model, inputs, checkpoint=False)
    loss_checkpointed, checkpointed = loss_and_grads(model, inputs, checkpoint=True)
    torch.testing.assert_close(loss_plain, loss_checkpointed, rtol=1e-12, atol=0)
    assert_same_grads(plain, checkpointed)
    assert any(g.abs().sum() > 0 for g in plain.values())


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_gradients_of_batch_shards_add_up_to_the_full_batch_gradient(pretrained_unet, adapter):
    model = make_model(pretrained_unet, perturbed=True, adapter=adapter, dtype=torch.float64)
    config = PathwiseConfig(batch_size=BATCH, num_inference_steps=STEPS,
                            truncation=Truncation("random", k=3))
    inputs = draw_inputs(model, config, generator=3)

    model.zero_grad(set_to_none=True)
    full_loss, _ = pathwise_loss(model, label_reward, inputs, config, normaliser=BATCH)
    full_loss.backward()
    full = trainable_grads(model)

    model.zero_grad(set_to_none=True)
    shard_losses = []
    for start, stop in [(0, 1), (1, BATCH)]:
        loss, metrics = pathwise_loss(model, label_reward, inputs.slice(start, stop), config,
                                      normaliser=BATCH)
        loss.backward()  # gradients accumulate in .grad, as the learner sums worker gradients
        shard_losses.append(loss.detach())
        assert metrics["num_samples"] == stop - start
    torch.testing.assert_close(sum(shard_losses), full_loss.detach(), rtol=1e-12, atol=0)
    assert_same_grads(full, trainable_grads(model))


def test_base_samples_of_a_single_gaussian_have_its_mean_and_covariance():
    alphas_cumprod = build_scheduler(
        ScheduleConfig(num_train_timesteps=1000, clip_sample=False)
    ).alphas_cumprod
    mean = torch.tensor([0.5, -0.3])
    covariance = torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    backbone = GaussianMixtureBackbone([1.0], mean[None], covariance[None], alphas_cumprod)
    model = AugmentedModel(backbone, {}, adapter="none")
    # DDPM ancestral under-disperses with few large steps (0.27 vs 0.30 at 50 steps): use 200.
    inputs = RolloutInputs.draw(0, 4000, 200, (2,), {})
    x0 = sample(model, inputs, compute_kl=False).x0
    assert (x0.mean(0) - mean).abs().max() < 0.04
    assert (torch.cov(x0.T) - covariance).abs().max() < 0.03


def test_rollout_inputs_are_reproducible_and_slice_consistently():
    first = RolloutInputs.draw(5, 6, STEPS, (1, 8, 8), LABELS, num_contexts=10,
                               label_distribution=[0, 0, 1, 0], context_distribution=[0] * 9 + [1])
    second = RolloutInputs.draw(5, 6, STEPS, (1, 8, 8), LABELS, num_contexts=10,
                                label_distribution=[0, 0, 1, 0], context_distribution=[0] * 9 + [1])
    assert torch.equal(first.step_noise, second.step_noise)
    assert torch.all(first.labels["compress_class"] == 2) and torch.all(first.contexts == 9)
    part = first.slice(2, 5)
    assert part.batch_size == 3 and part.step_noise.shape == (STEPS, 3, 1, 8, 8)
    assert torch.equal(part.step_noise, first.step_noise[:, 2:5])
    with pytest.raises(InputError, match="label_distribution"):
        RolloutInputs.draw(5, 6, STEPS, (1, 8, 8), LABELS, label_distribution=[1, 0])


def test_sampling_rejects_labels_outside_the_declared_classes(pretrained_unet):
    model = make_model(pretrained_unet, perturbed=False)
    inputs = make_inputs()
    inputs.labels["compress_class"] = torch.tensor([0, 1, 7, 2])
    with pytest.raises(InputError, match="compress_class"):
        sample(model, inputs)


def test_drawing_a_shards_rows_equals_slicing_the_whole_draw():
    """A rollout worker draws only its rows from the batch's seed; they must be the rows one
    process draws for the whole batch."""
    whole = RolloutInputs.draw(9, 7, STEPS, (1, 8, 8), LABELS, num_contexts=10)
    for start, stop in ((0, 3), (3, 7), (5, 6)):
        part = RolloutInputs.draw(9, 7, STEPS, (1, 8, 8), LABELS, num_contexts=10,
                                  rows=(start, stop))
        expected = whole.slice(start, stop)
        assert torch.equal(part.initial_noise, expected.initial_noise)
        assert torch.equal(part.step_noise, expected.step_noise)
        assert torch.equal(part.contexts, expected.contexts)
        assert all(torch.equal(part.labels[n], expected.labels[n]) for n in LABELS)
        assert torch.equal(part.candidate_seeds, expected.candidate_seeds)
    assert not torch.equal(whole.initial_noise[0], whole.initial_noise[1])


def test_the_path_log_ratio_averages_to_the_path_kl(pretrained_unet):
    """E_q[log q/p(path)] = KL(q || p): the weights a policy's samples carry to the base."""
    model = make_model(pretrained_unet, perturbed=True)
    with torch.no_grad():
        trajectory = sample(model, make_inputs(seed=3, batch=256), compute_log_ratio=True)
    log_ratio, kl = trajectory.path_log_ratio, trajectory.path_kl
    standard_error = float(log_ratio.std()) / 256**0.5
    assert float(kl.mean()) > 5 * standard_error   # a KL the test can tell from zero
    assert abs(float(log_ratio.mean() - kl.mean())) < 4 * standard_error
