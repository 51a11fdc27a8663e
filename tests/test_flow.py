"""Flow-matching models (`ctrl_ray.models.flow`): the rectified flow as a VP process on rescaled
states, checked on the analytic Gaussian mixture (exact velocity: the sampler's marginals at every
step for the ODE and the SDE, the theorem), and SD3-format folders (a real SD3 layout with two
CLIP encoders, ctrl-ray's own MiniLM layout) through every update rule on Ray."""

from __future__ import annotations

import math

import pytest
import test_theorem
import torch
from flow_fixtures import build_tiny_flow_testbed, build_tiny_sd3

from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.flow import SD3Backbone, is_flow_pipeline, shifted_sigmas
from ctrl_ray.models.flow_gaussian_mixture import FlowGaussianMixtureBackbone
from ctrl_ray.models.flow_prompts import SD3Prompts, SingleEncoderPrompts
from ctrl_ray.models.gaussian_mixture import GaussianMixtureBackbone
from ctrl_ray.models.loading import backbone_spec, build_backbone
from ctrl_ray.models.text_to_image_options import TextToImageOptions
from ctrl_ray.registry import load_base_model
from ctrl_ray.sampling import DenoisingSchedule, RolloutInputs, sample

PROMPTS = ["a handwritten seven", "a handwritten one"]
# A mixture with correlated, unequal components for the marginal check.
WEIGHTS = [0.6, 0.4]
MEANS = [[-0.8, 0.3], [0.9, -0.2]]
COVARIANCES = [[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.25]]]


def flow_mixture(weights=WEIGHTS, means=MEANS, covariances=COVARIANCES, shift=1.0, seed=0,
                 **widths) -> FlowGaussianMixtureBackbone:
    return FlowGaussianMixtureBackbone(weights, means, covariances, shifted_sigmas(1000, shift),
                                       seed=seed, **widths)


def test_flow_mixture_density_and_velocity_are_exact():
    backbone = flow_mixture().double()
    x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.001, 0.2, 0.5, 0.8, 0.99, 1.0], dtype=torch.float64)
    keep = (1 - s)[:, None, None, None]
    noised = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(backbone.weights.expand(6, 2)),
        torch.distributions.MultivariateNormal(
            keep[..., 0] * backbone.means,
            keep**2 * backbone.covariances + s[:, None, None, None] ** 2 * torch.eye(2)))
    log_prob, velocity = backbone.flow_log_prob_and_velocity(x, s)
    # (Categorical renormalises the float32-normalised weights: 3e-8)
    torch.testing.assert_close(log_prob, noised.log_prob(x), rtol=1e-7, atol=1e-7)
    # v = E[eps - x0 | x_s] = (eps_hat - x_s) / (1 - s) with eps_hat = -s grad log p_s (s < 1);
    # at s = 1, p_1 = N(0, I): eps = x_s and E[x0] is the prior mean.
    (score,) = torch.autograd.grad(noised.log_prob(x).sum(), x)
    expected = (-s[:, None] * score - x) / (1 - s[:, None])
    torch.testing.assert_close(velocity[:5], expected[:5], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(velocity[5], x[5] - backbone.weights @ backbone.means)


def test_flow_mixture_is_the_vp_mixture_on_rescaled_states():
    """x~ = x_s / r(s) is the VP process with abar = (1 - s)^2 / r^2: the flow backbone's noise
    prediction (velocity converted, residual MLP included) is the VP mixture's on that table."""
    flow = flow_mixture(shift=3.0)
    sigmas = flow.flow_sigmas.double()
    torch.testing.assert_close(flow.alphas_cumprod.double(),
                               (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2))
    vp = GaussianMixtureBackbone(WEIGHTS, MEANS, COVARIANCES, flow.alphas_cumprod)
    with torch.no_grad():
        for parameter in flow.network.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        vp.network.load_state_dict(flow.network.state_dict())
    # From t = 5 on: below it abar rounds to within 1e-4 of 1 in float32 and the VP's
    # sqrt(1 - abar) keeps only 3 digits (the flow's s / r(s) keeps them all).
    x, extra = torch.randn(6, 2), torch.randn(6, 32)
    t = torch.tensor([5, 50, 100, 500, 900, 990])
    torch.testing.assert_close(flow.predict_noise(x, t, None, extra),
                               vp.predict_noise(x, t, None, extra), rtol=1e-4, atol=1e-4)


def test_the_noise_level_eta_maps_to_the_flow_sde():
    """In the flow's coordinates the sampler's step with eta = 0 is the Euler step of the flow
    ODE, with eta = 1 the flow's posterior (memoryless) step, and in general its variance is
    sigma(s)^2 |ds| with Flow-GRPO's sigma(s) = eta sqrt(2 s / (1 - s)) as steps shrink."""
    backbone = flow_mixture(shift=3.0).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    ode = DenoisingSchedule.create(backbone.alphas_cumprod.double(), 50, eta=0.0)
    next_index = torch.cat([ode.timesteps[1:], ode.timesteps.new_zeros(1)])
    for step in (0, 20, 49):
        t, t_next = ode.timesteps[step], next_index[step]
        s, s_next = backbone.flow_sigmas[t], backbone.flow_sigmas[t_next]
        x_s = backbone.flow_state(x, t)
        eps = backbone.predict_noise(x, t.expand(5), None)
        velocity = backbone.predict_velocity(x_s, t.expand(5), None)
        euler = x_s + (s_next - s) * velocity
        # (the float32 tables of s and abar agree to float32 rounding)
        torch.testing.assert_close(backbone.flow_state(ode.mean(step, x, eps, False), t_next),
                                   euler, rtol=1e-6, atol=1e-6)
    memoryless = DenoisingSchedule.create(backbone.alphas_cumprod.double(), 50, eta=1.0)
    s, s_next = backbone.flow_sigmas[memoryless.timesteps], backbone.flow_sigmas[next_index]
    radius_next = torch.hypot(1 - s_next, s_next)
    bridge = s_next**2 * (1 - ((1 - s) * s_next / ((1 - s_next) * s)) ** 2)
    # Where s_next < 0.05, 1 - abar < 3e-3 keeps few digits in the float32 table.
    noisy = s_next > 0.05
    torch.testing.assert_close((radius_next * memoryless.sigmas)[noisy] ** 2, bridge[noisy],
                               rtol=1e-5, atol=0)
    # The limit, on a table of 20,000 noise levels (the gap is O(ds / s): 2.5% at s = 0.25 on
    # the 1000-level table with shift 3, 0.1% here).
    sigmas = shifted_sigmas(20_000, 3.0)
    alphas_cumprod = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
    for eta in (0.5, 1.0):
        fine = DenoisingSchedule.create(alphas_cumprod, 19_999, eta=eta)
        s, s_next = sigmas[fine.timesteps[:-1]], sigmas[fine.timesteps[1:]]
        variance = (torch.hypot(1 - s_next, s_next) * fine.sigmas[:-1]) ** 2
        inside = (s > 0.05) & (s < 0.95)
        sde = eta**2 * 2 * s / (1 - s) * (s - s_next)
        torch.testing.assert_close(variance[inside], sde[inside], rtol=0.01, atol=0)


def moment_deviations(states: torch.Tensor, mean: torch.Tensor,
                      covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|sample mean - mean| and |sample covariance - covariance| of states (N, 2), each divided
    by its Monte-Carlo standard error (from the samples' own spread)."""
    count = states.shape[0]
    centred = states - states.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    mean_z = (states.mean(0) - mean).abs() / (covariance.diagonal() / count).sqrt()
    covariance_z = (products.mean(0) - covariance).abs() / (products.std(0) / math.sqrt(count))
    return mean_z, covariance_z


MARGINAL_STEPS, MARGINAL_SAMPLES = 400, 32_000


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sampler_marginals_are_the_flow_marginals_at_every_step(eta):
    """From exact samples of p_s at the first grid point, the sampler's states after each of 400
    steps have p_s's mean and covariance (s of that step) within 5 Monte-Carlo standard errors
    (32,000 samples), for the ODE (eta = 0), an intermediate noise level and the memoryless
    SDE (eta = 1). Measured, worst over every step and moment: 1.85 / 2.68 / 3.16 standard
    errors; with 100 steps the discretisation error shows, 5.06 / 6.19 / 7.41."""
    backbone = flow_mixture(hidden_dim=4, embedding_dim=8)
    model = AugmentedModel(backbone, {}, adapter="none")
    grid = DenoisingSchedule.create(backbone.alphas_cumprod, MARGINAL_STEPS, eta).timesteps
    sigmas = backbone.flow_sigmas[torch.cat([grid, grid.new_zeros(1)])]
    generator = torch.Generator().manual_seed(0)
    start = sigmas[0]
    x0 = backbone.sample(MARGINAL_SAMPLES, generator)
    noise = torch.randn(MARGINAL_SAMPLES, 2, generator=generator)
    initial = ((1 - start) * x0 + start * noise) / torch.hypot(1 - start, start)
    step_noise = torch.randn(MARGINAL_STEPS, MARGINAL_SAMPLES, 2, generator=generator)
    trajectory = sample(model, RolloutInputs({}, None, initial, step_noise), eta=eta,
                        compute_kl=False)
    worst = 0.0
    for state, s in zip(trajectory.states, sigmas, strict=True):
        component_means, component_covariances = backbone.flow_marginal(s[None])
        weights = backbone.weights[:, None]
        mean = (weights * component_means[0]).sum(0)
        second_moment = (weights[..., None] * (component_covariances[0] + component_means[0][
            :, :, None] * component_means[0][:, None, :])).sum(0)
        mean_z, covariance_z = moment_deviations(
            state * torch.hypot(1 - s, s), mean, second_moment - mean[:, None] * mean[None, :])
        worst = max(worst, float(mean_z.max()), float(covariance_z.max()))
    assert worst < 5, worst


@pytest.mark.parametrize("rule", sorted(test_theorem.RULES))
def test_fine_tuning_a_flow_reaches_the_tilted_posterior(rule, monkeypatch):
    """tests/test_theorem.py's test, word for word, with its mixture as a flow (exact velocity,
    noise levels s = (i + 1) / 1000): CTRL lands on p_pre p(y | x) and not on p(y | x)^2 or
    p(y | x)^0.5, with the same margins."""
    def flow_theorem_mixture(seed: int = 0) -> FlowGaussianMixtureBackbone:
        return flow_mixture(test_theorem.WEIGHTS, test_theorem.MEANS, test_theorem.COVARIANCES,
                            seed=seed, hidden_dim=64)

    monkeypatch.setattr(test_theorem, "mixture_backbone", flow_theorem_mixture)
    test_theorem.test_ctrl_samples_the_true_posterior(rule)


# -- SD3-format folders -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A Stable-Diffusion-3-format folder with random weights: CLIP x2, no T5, shift 3."""
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def tiny_flow_testbed(tmp_path_factory):
    """ctrl-ray's own flow layout (one MiniLM encoder) as `save_flow_pipeline` writes it."""
    return build_tiny_flow_testbed(tmp_path_factory.mktemp("flow") / "tiny-flow", PROMPTS)


def test_an_sd3_folder_encodes_prompts_as_diffusers_does(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    assert is_flow_pipeline(tiny_sd3) and not (tiny_sd3 / "ctrl_ray.json").exists()
    base = load_base_model(tiny_sd3)
    assert base.metadata["kind"] == "sd3" and base.image_shape == (3, 8, 8)
    backbone = build_backbone(base, TextToImageOptions(prompts=PROMPTS))
    assert isinstance(backbone, SD3Backbone) and isinstance(backbone.prompt_encoder, SD3Prompts)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True,
                                                        text_encoder_3=None, tokenizer_3=None)
    states, _, pooled, _ = pipeline.encode_prompt(PROMPTS, None, None,
                                                  do_classifier_free_guidance=False)
    assert states.shape == (2, 12 + 256, 48)   # CLIP tokens, then T5's 256 (zeros: no T5)
    torch.testing.assert_close(backbone.prompt_states, states)
    torch.testing.assert_close(backbone.prompt_pooled, pooled)
    assert backbone.add_prompt("a zero") == 2 and backbone.num_contexts == 3
    assert backbone_spec(backbone)["kind"] == "sd3"


def test_the_flow_backbone_converts_the_transformer_velocity(tiny_flow_testbed):
    """ctrl-ray's layout reloads with its metadata and MiniLM; predict_noise = x_s + (1 - s) v
    of the transformer at timestep s * 1000; decode undoes the rescaling and SD3's latent
    normalisation; the augmented model starts as the base, with LoRA on attention only."""
    base = load_base_model(tiny_flow_testbed)
    assert base.metadata["kind"] == "sd3" and base.metadata["prompts"] == PROMPTS
    assert base.metadata["max_length"] == 8 and base.metadata["text_encoder"]
    backbone = build_backbone(base)
    assert isinstance(backbone.prompt_encoder, SingleEncoderPrompts)
    assert backbone.sample_shape == (4, 4, 4) and backbone.image_shape == (3, 8, 8)
    states, pooled = backbone.prompt_encoder.encoder.encode_with_embedding(PROMPTS)
    assert states.shape == (2, 8, 384)
    torch.testing.assert_close(backbone.prompt_pooled, pooled)

    x, t, contexts = torch.randn(2, 4, 4, 4), torch.tensor([50, 700]), torch.tensor([1, 0])
    s = backbone.flow_sigmas[t].view(2, 1, 1, 1)
    x_s = x * torch.hypot(1 - s, s)
    velocity = base.transformer(hidden_states=x_s, encoder_hidden_states=states[contexts],
                                pooled_projections=pooled[contexts],
                                timestep=s.flatten() * 1000).sample
    torch.testing.assert_close(backbone.predict_noise(x, t, contexts), x_s + (1 - s) * velocity)

    vae = base.vae
    s0 = backbone.flow_sigmas[0]
    expected = vae.decode(x * torch.hypot(1 - s0, s0) / vae.config.scaling_factor
                          + vae.config.shift_factor).sample
    torch.testing.assert_close(backbone.decode(x), expected)

    model = AugmentedModel(backbone, {"compress_class": 4})
    labels = {"compress_class": torch.tensor([1, 2])}
    assert torch.equal(model.predict_noise(x, t, contexts, labels),
                       model.reference_noise(x, t, contexts))
    adapted = {id(p) for p in model.trainable_parameter_groups()["adapter"]}
    names = [n for n, p in model.named_parameters() if id(p) in adapted]
    assert names and all(n.startswith("backbone.network.transformer_blocks.") and ".attn." in n
                         for n in names)
    with torch.no_grad():
        model.label_embeddings["compress_class"].weight[:-1].normal_()
    assert not torch.allclose(model.predict_noise(x, t, contexts, labels),
                              model.reference_noise(x, t, contexts))
