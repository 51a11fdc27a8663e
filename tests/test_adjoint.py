"""Adjoint Matching: exact properties of its gradient (the theorem test checks where it lands)."""

from __future__ import annotations

import torch
from test_theorem import STEPS, classifier_log_likelihood, mixture_backbone

from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.objectives import adjoint, pathwise
from ctrl_ray.objectives.adjoint import AdjointConfig
from ctrl_ray.objectives.base import draw_inputs, make_optimizer
from ctrl_ray.objectives.pathwise import PathwiseConfig


def _model(adapter: str = "full") -> AugmentedModel:
    torch.manual_seed(0)
    return AugmentedModel(mixture_backbone(0), {"y": 2}, adapter=adapter, lora_rank=4)


def test_gradient_at_the_base_is_the_full_pathwise_reward_gradient():
    # At theta = pre the policy's dynamics are the base's, so the lean adjoint is the full one
    # and the regression's gradient is -grad E[log p(y | x0)]; pathwise's KL gradient is zero.
    model = _model()
    config = AdjointConfig(batch_size=64, num_inference_steps=STEPS)
    inputs = draw_inputs(model, config, torch.Generator().manual_seed(1))
    payload, _ = adjoint.worker_step(model, classifier_log_likelihood, inputs, config,
                                     inputs.batch_size, 0)
    adjoint_grads = payload["gradients"]
    pathwise_config = PathwiseConfig(batch_size=64, num_inference_steps=STEPS, checkpoint=False)
    pathwise_grads, _ = pathwise.worker_step(model, classifier_log_likelihood, inputs,
                                             pathwise_config, inputs.batch_size, 0)
    assert adjoint_grads.keys() == pathwise_grads.keys()
    total = torch.cat([g.flatten() for g in pathwise_grads.values()]).norm()
    assert total > 1e-3
    for name, gradient in pathwise_grads.items():
        error = (adjoint_grads[name] - gradient).norm()
        assert error <= 1e-4 * total + 1e-7, (name, float(error), float(total))


def test_a_flat_reward_leaves_the_policy_exactly_at_the_base():
    model = _model("lora")
    config = AdjointConfig(batch_size=32, num_inference_steps=STEPS, lr_embedding=0.1,
                           lr_adapter=0.1)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(2)

    def flat(x0, labels, contexts):
        return torch.zeros(x0.shape[0]) + 0.0 * x0.sum()

    for _ in range(3):
        metrics = adjoint.train_step(model, optimizer, flat, draw_inputs(model, config, generator),
                                     config)
        assert metrics["grad_norm"] == 0.0 and metrics["kl"] == 0.0
    x, t = torch.randn(16, 2), torch.randint(0, 1000, (16,))
    with torch.no_grad():
        policy = model.predict_noise(x, t, None, {"y": torch.randint(0, 2, (16,))})
        assert torch.equal(policy, model.reference_noise(x, t, None))


def test_shards_add_up_to_the_full_batch_gradient():
    model = _model("lora")
    model.label_embeddings["y"].weight.data.normal_()  # off the base, so targets and shifts mix
    config = AdjointConfig(batch_size=16, num_inference_steps=STEPS)
    inputs = draw_inputs(model, config, torch.Generator().manual_seed(3))
    full = adjoint.worker_step(model, classifier_log_likelihood, inputs, config, 16, 0)[0]
    full = full["gradients"]
    halves = [adjoint.worker_step(model, classifier_log_likelihood, inputs.slice(i, i + 8),
                                  config, 16, 0)[0]["gradients"] for i in (0, 8)]
    for name, gradient in full.items():
        error = (halves[0][name] + halves[1][name] - gradient).abs().max()
        assert error <= 1e-5 * gradient.abs().max() + 1e-8, name


def test_further_regression_steps_on_pooled_shards_match_one_full_batch():
    # regression_steps > 1: the learner's extra steps on the workers' pooled batch give the
    # parameters of the same steps taken in one process on the full batch.
    config = AdjointConfig(batch_size=16, num_inference_steps=STEPS, regression_steps=3,
                           lr_embedding=0.05, lr_adapter=0.05)
    inputs = draw_inputs(_model("lora"), config, torch.Generator().manual_seed(4))
    single, sharded = _model("lora"), _model("lora")
    metrics = adjoint.train_step(single, make_optimizer(single, config),
                                 classifier_log_likelihood, inputs, config)
    payloads = [adjoint.worker_step(sharded, classifier_log_likelihood, inputs.slice(i, i + 8),
                                    config, 16, 0)[0] for i in (0, 8)]
    adjoint.learner_step(sharded, make_optimizer(sharded, config), payloads, config, None, 0)
    assert metrics["loss_last"] < metrics["loss"]  # the extra steps fit the same targets better
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters(),
                                     strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
