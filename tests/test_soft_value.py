"""The value head (adapter ``value``) and its loss: exact conditional means, null labels, a policy
that starts as the base model and that its trainable state rebuilds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_theorem import mixture_backbone

from ctrl_ray.config import load_config
from ctrl_ray.errors import InputError
from ctrl_ray.finetune import FinetuneConfig
from ctrl_ray.models.augmented import AugmentedModel
from ctrl_ray.models.soft_value import SoftValueNet, SoftValueSpec, value_loss
from ctrl_ray.sampling import RolloutInputs, sample


def test_value_loss_is_minimised_by_log_of_the_conditional_mean():
    """At one state, the fitted log h_y is log E[p(y | x0)^lambda] for a tilt lambda != 1."""
    torch.manual_seed(0)
    net = SoftValueNet(SoftValueSpec([2], {"a": 2, "b": 3}, None, hidden_dim=16))
    probabilities_a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])
    probabilities_b = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4],
                                    [0.2, 0.5, 0.3]])
    tilt = 2.0
    joint = probabilities_a[:, :, None] * probabilities_b[:, None, :]   # (4, 2, 3), a-major
    log_targets = tilt * joint.flatten(1).log()
    x, t = torch.zeros(4, 2), torch.full((4,), 500)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(1500):
        optimizer.zero_grad()
        value_loss(net, x, t, None, log_targets).backward()
        optimizer.step()
    log_q, log_m = net(x[:1], t[:1], None)
    expected = (joint**tilt).mean(0).flatten().log()
    assert torch.allclose(log_q[0] + log_m[0], expected, atol=2e-3), (log_q + log_m, expected)


def test_null_labels_are_marginalised_and_all_null_rows_get_no_control():
    torch.manual_seed(0)
    net = SoftValueNet(SoftValueSpec([2], {"a": 2, "b": 3}, None, hidden_dim=16))
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    x, t = torch.randn(3, 2), torch.full((3,), 300)
    labels = {"a": torch.tensor([1, 2, 2]), "b": torch.tensor([3, 0, 3])}   # 2, 3 = null
    gradient = net.grad_log_value(x, t, None, labels)

    def log_h(rows, columns):
        log_q, log_m = net(rows, t[:1], None)
        return torch.logsumexp(log_q[:, columns], 1) + log_m

    a_is_1 = [3, 4, 5]      # targets (1, 0), (1, 1), (1, 2) in a-major order
    b_is_0 = [0, 3]         # targets (0, 0), (1, 0)
    for row, columns in ((0, a_is_1), (1, b_is_0)):
        point = x[row:row + 1].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(log_h(point, columns).sum(), point)
        assert torch.allclose(gradient[row], expected[0], atol=1e-6)
    assert gradient[1].abs().sum() > 0
    assert torch.all(gradient[2] == 0)


def test_the_tilted_step_is_the_mean_of_the_tilted_transition():
    """With offsets, the shift is E[x'] - mean under N(mean, sigma^2) h(x') / E[h] (Stein's
    identity), not the first-order sigma^2 grad log h(mean); both agree as sigma -> 0."""
    torch.manual_seed(0)
    net = SoftValueNet(SoftValueSpec([2], {"y": 2}, None, hidden_dim=16))
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.4)
    mean, t, labels = torch.tensor([[0.3, -0.2]]), torch.full((1,), 400), {"y": torch.tensor([1])}
    offsets = torch.randn((20_000, 1, 2), generator=torch.Generator().manual_seed(1))
    small = torch.tensor(1e-3)
    assert torch.allclose(net.mean_shift(mean, small, t, None, labels, offsets),
                          net.mean_shift(mean, small, t, None, labels, None), rtol=1e-3)
    sigma = torch.tensor(0.5)
    shift = net.mean_shift(mean, sigma, t, None, labels, offsets)
    first_order = net.mean_shift(mean, sigma, t, None, labels, None)
    points = mean + sigma * torch.cat([offsets, -offsets]).flatten(0, 1)
    with torch.no_grad():
        log_h, _ = net.log_value(points, t, None, {"y": torch.ones(len(points), dtype=int)})
    weights = torch.softmax(log_h, 0)
    assert 1 / (weights**2).sum() > 5_000   # the brute-force tilted mean is well estimated
    exact = (weights[:, None] * points).sum(0) - mean[0]
    assert torch.allclose(shift[0], exact, rtol=0.05, atol=0.01), (shift, exact)
    # the curvature of log h over a sigma-ball is what the tilted step adds
    assert (shift - first_order).norm() > 0.2 * first_order.norm(), (shift, first_order)


def twin_heads(key: str, *values: float) -> list[SoftValueNet]:
    """Heads with the same random (non-flat) weights, one per value of the spec's `key`."""
    torch.manual_seed(0)
    nets = [SoftValueNet(SoftValueSpec([2], {"y": 2}, None, hidden_dim=16, **{key: value}))
            for value in values]
    for parameter in nets[0].parameters():
        torch.nn.init.normal_(parameter, std=0.4)
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    return nets


def test_the_step_scale_multiplies_either_step_and_must_be_positive():
    """`step_scale` multiplies the first-order and the tilted shift of the same head."""
    nets = twin_heads("step_scale", 1.0, 1.5)
    mean, t, labels = torch.tensor([[0.3, -0.2]]), torch.full((1,), 400), {"y": torch.tensor([1])}
    offsets = torch.randn((4, 1, 2), generator=torch.Generator().manual_seed(1))
    for step in (offsets, None):
        one, scaled = (net.mean_shift(mean, torch.tensor(0.5), t, None, labels, step)
                       for net in nets)
        assert one.norm() > 1e-3
        assert torch.allclose(scaled, 1.5 * one, rtol=1e-5, atol=1e-7)
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(InputError, match="step_scale"):
            SoftValueSpec([2], {"y": 2}, step_scale=bad)


def test_a_rows_step_candidates_are_its_own_alone_or_in_any_batch():
    inputs = RolloutInputs.draw(0, 5, 3, (1, 4, 4), {"y": 2})
    whole = inputs.candidate_noise(2, 3)
    assert whole.shape == (3, 5, 1, 4, 4)
    assert torch.equal(inputs.slice(1, 3).candidate_noise(2, 3), whole[:, 1:3])
    assert not torch.equal(inputs.candidate_noise(1, 3), whole)
    with pytest.raises(InputError, match="step_candidates"):
        SoftValueSpec([2], {"y": 2}, step_candidates=3)


def test_the_tilt_of_x_T_is_the_tilted_prior_mean_and_its_kl_joins_step_one():
    """With log h linear, log h(x) = a.x, N(0, I) h / E[h] is N(a, I): x_T moves by a exactly,
    step 1's KL gains |a|^2 / 2 (its own shift sigma^2 a costs sigma^2 |a|^2 / 2), and the
    path's log ratio still averages to its KL."""
    torch.manual_seed(0)
    a = torch.tensor([0.6, -0.3])
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                           value_head={"initial_candidates": 8, "step_candidates": 4})
    model.value_head.log_value = lambda x, t, contexts, labels: (
        x @ a, torch.ones(len(x), dtype=torch.bool))
    inputs = RolloutInputs.draw(0, 512, 8, (2,), {"y": 2})
    with torch.no_grad():
        trajectory = sample(model, inputs, compute_log_ratio=True)
    torch.testing.assert_close(trajectory.states[0], inputs.initial_noise + a)
    sigma = trajectory.sigmas[0]
    expected = (sigma**2 + 1) * (a**2).sum() / 2
    torch.testing.assert_close(trajectory.kl[0], expected.expand(512), rtol=1e-4, atol=1e-6)
    log_ratio, kl = trajectory.path_log_ratio, trajectory.path_kl
    assert abs(float(log_ratio.mean() - kl.mean())) < 4 * float(log_ratio.std()) / 512**0.5
    model.value_head.spec.initial_candidates = 0
    with torch.no_grad():
        untilted = sample(model, inputs)
    assert torch.equal(untilted.states[0], inputs.initial_noise)
    with pytest.raises(InputError, match="initial_candidates"):
        SoftValueSpec([2], {"y": 2}, initial_candidates=5)


def test_the_policy_spec_carries_the_step_scale():
    """A saved value policy is rebuilt with the step scale it was sampled with (before, the
    spec left it out and a loaded policy stepped at 1)."""
    from ctrl_ray.checkpoint import policy_spec

    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                           value_head={"step_scale": 1.35})
    spec = policy_spec(model, {}, {}, "base", 4, None, None)
    rebuilt = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                             value_head=spec["value_head"])
    assert rebuilt.value_head.spec.step_scale == 1.35


def test_a_value_policy_starts_as_the_base_and_its_trainable_state_rebuilds_it():
    torch.manual_seed(0)
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    inputs = RolloutInputs.draw(0, 64, 8, (2,), {"y": 2})
    start = sample(model, inputs)
    assert torch.equal(start.x0, sample(model, inputs, from_reference=True).x0)
    assert start.path_kl.abs().max() == 0
    assert set(model.trainable_state_dict()) == {
        name for name, _ in model.named_parameters() if name.startswith("value_head.")}
    for parameter in model.value_head.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    trained = sample(model, inputs)
    assert trained.path_kl.mean() > 1e-3
    rebuilt = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    rebuilt.load_trainable_state_dict(model.trainable_state_dict())
    assert torch.allclose(sample(rebuilt, inputs).x0, trained.x0, atol=1e-6)


@pytest.mark.parametrize("mode, kind", [("value", "lora"), ("adjoint", "value")])
def test_the_value_rule_and_the_value_head_go_together(mode, kind):
    with pytest.raises(InputError, match="value head"):
        load_config(FinetuneConfig, overrides=[f"mode={mode}", f"adapter.kind={kind}"])


def test_the_replay_keeps_the_newest_base_rollouts_in_order():
    from ctrl_ray.objectives.value import Replay

    def payload(first, rows):
        ids = torch.arange(first, first + rows, dtype=torch.float32)
        return {"states": ids.view(1, rows, 1).expand(3, rows, 1), "contexts": ids.long(),
                "log_targets": ids.view(rows, 1).expand(rows, 2)}

    replay = Replay(5)
    replay.add([payload(0, 3)])
    replay.add([payload(3, 2), payload(5, 2)])
    assert replay.contexts.tolist() == [2, 3, 4, 5, 6]
    assert replay.states[2, :, 0].tolist() == [2, 3, 4, 5, 6]
    assert replay.log_targets[:, 1].tolist() == [2, 3, 4, 5, 6]
    replay = Replay(0)   # 0: only the latest batch, however large
    replay.add([payload(0, 3)])
    replay.add([payload(3, 4)])
    assert replay.contexts.tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("shape", [(4, 8, 8), (16, 4, 6), (1, 16, 16)])
def test_the_head_takes_any_channel_count_and_size(shape):
    net = SoftValueNet(SoftValueSpec(list(shape), {"y": 3}, num_contexts=10, channels=[8, 16]))
    log_q, log_m = net(torch.randn(5, *shape), torch.full((5,), 400), torch.arange(5))
    assert log_q.shape == (5, 3) and log_m.shape == (5,)


def test_coordinate_channels_let_the_head_tell_where_the_ink_is(tiny_base):
    """Far from the border a conv stack with a global average pool cannot tell a dot's
    position (its features only move); with coordinate channels it can. And a head saved
    before coordinates existed is rebuilt without them."""
    from ctrl_ray.checkpoint import build_policy
    from ctrl_ray.models.loading import load_base_model_dir

    torch.manual_seed(0)
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 14:18, 10:14] = images[1, 0, 14:18, 16:20] = 1.0   # an even shift, far
                                                                        # from the border
    for coordinates in (False, True):
        net = SoftValueNet(SoftValueSpec([1, 32, 32], {"y": 2}, channels=[4, 8],
                                         coordinates=coordinates))
        torch.nn.init.normal_(net.head.weight)
        log_q, log_m = net(images, torch.full((2,), 500), None)
        outputs = torch.cat([log_q, log_m[:, None]], 1)
        gap = (outputs[0] - outputs[1]).abs().max().item()
        assert (gap > 1e-3) if coordinates else (gap < 1e-5)
    old = {"channels": [4, 8], "hidden_dim": 16, "time_embedding_dim": 8,
           "step_candidates": 0, "step_scale": 1.0}
    spec = {"label_classes": {"y": 2}, "adapter": "value", "lora_rank": 4, "lora_alpha": None,
            "lora_targets": None, "value_head": old}
    base = load_base_model_dir(tiny_base.model_dir)
    assert not build_policy(base, spec).value_head.spec.coordinates
    new = {**spec, "value_head": {**old, "coordinates": True}}
    assert build_policy(base, new).value_head.spec.coordinates


def test_a_prompt_embedding_head_learns_a_prompt_dependent_value_and_reads_any_prompt():
    """Conditioned on a text embedding (not an index), the head separates two prompts by what
    follows them and gives a prompt it never saw a finite value."""
    torch.manual_seed(0)
    net = SoftValueNet(SoftValueSpec([2], {"y": 2}, context_dim=8, hidden_dim=16))
    prompts = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)   # 2 seen, 1 new
    targets = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()               # p(y | prompt)
    x, t = torch.zeros(2, 2), torch.full((2,), 500)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(800):
        optimizer.zero_grad()
        value_loss(net, x, t, prompts[:2], targets).backward()
        optimizer.step()
    log_q, _ = net(x, t, prompts[:2])
    assert torch.allclose(log_q.exp(), targets.exp(), atol=0.02), log_q.exp()
    log_q, log_m = net(x[:1], t[:1], prompts[2:])
    assert torch.isfinite(log_q).all() and torch.isfinite(log_m).all()


def test_value_head_widths_come_from_the_config_and_a_wrong_key_is_refused():
    config = load_config(FinetuneConfig, overrides=[
        "mode=value", "adapter.value_head={channels: [8, 16], hidden_dim: 32}"])
    assert config.adapter.value_head == {"channels": [8, 16], "hidden_dim": 32}
    with pytest.raises(InputError, match="adapter.value_head.width"):
        load_config(FinetuneConfig, overrides=["mode=value", "adapter.value_head={width: 8}"])
    with pytest.raises(InputError, match="value_head.channels"):
        AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                       value_head={"channels": [0]})
    config = load_config(FinetuneConfig, overrides=[
        "mode=value", "adapter.value_head={step_candidates: 0}"])
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                           value_head=config.adapter.value_head)
    assert model.step_candidates == 0
    with pytest.raises(InputError, match="step_candidates"):
        load_config(FinetuneConfig,
                    overrides=["mode=value", "adapter.value_head={step_candidates: 3}"])
    with pytest.raises(InputError, match="coordinates"):
        load_config(FinetuneConfig,
                    overrides=["mode=value", "adapter.value_head={coordinates: maybe}"])


def test_the_evaluation_samples_the_chain_the_head_is_fitted_on_unless_told_otherwise():
    value = ["mode=value", "objective.num_inference_steps=20", "evaluation.num_inference_steps=50"]
    with pytest.raises(InputError, match="evaluation.num_inference_steps 50 .fitted: 20."):
        load_config(FinetuneConfig, overrides=value).check_evaluation_chain()
    load_config(FinetuneConfig, overrides=[
        *value, "evaluation.allow_other_chain=true"]).check_evaluation_chain()
    load_config(FinetuneConfig, overrides=[*value, "evaluate=false"]).check_evaluation_chain()


def test_the_learner_holds_out_every_kth_rollout_and_never_takes_a_worse_head():
    """Early stopping on held-out base rollouts: with a learning rate that wrecks the fit, the
    head leaves the update with the weights it came in with (a lower held-out loss)."""
    from ctrl_ray.objectives.base import make_optimizer
    from ctrl_ray.objectives.value import Replay, ValueConfig, learner_step

    replay = Replay(100, heldout_every=4)
    rows = torch.arange(10, dtype=torch.float32)
    replay.add([{"states": rows.view(1, 10, 1).expand(3, 10, 1), "contexts": None,
                 "log_targets": rows.view(10, 1).expand(10, 2)}])
    assert torch.nonzero(replay.heldout).flatten().tolist() == [0, 4, 8]

    torch.manual_seed(0)
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    inputs = RolloutInputs.draw(0, 64, 8, (2,), {"y": 2})
    base = sample(model, inputs, from_reference=True)
    log_targets = torch.stack([-torch.nn.functional.softplus(-base.x0[:, 0] * s)
                               for s in (1.0, -1.0)], 1)
    payload = {"states": base.states, "log_targets": log_targets, "contexts": None}
    config = ValueConfig(batch_size=64, num_inference_steps=8, regression_steps=20,
                         check_every=5, lr_adapter=50.0, max_grad_norm=None)
    before = {k: v.clone() for k, v in model.value_head.state_dict().items()}
    metrics = learner_step(model, make_optimizer(model, config), [payload], config,
                           torch.Generator().manual_seed(0), 0)
    after = model.value_head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), metrics
    sensible = ValueConfig(batch_size=64, num_inference_steps=8, regression_steps=20,
                           check_every=5, lr_adapter=3e-3)
    metrics = learner_step(model, make_optimizer(model, sensible), [payload], sensible,
                           torch.Generator().manual_seed(0), 0)
    assert any(not torch.equal(before[k], model.value_head.state_dict()[k]) for k in before)


def test_the_final_fit_continues_on_the_whole_replay_and_never_ends_worse():
    """After a short online fit the final fit lowers the held-out loss further (it keeps its
    best weights, so it never raises it); none without steps or a replay."""
    from ctrl_ray.objectives.base import make_optimizer
    from ctrl_ray.objectives.value import ValueConfig, final_fit, learner_step

    torch.manual_seed(0)
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    config = ValueConfig(batch_size=256, num_inference_steps=8, regression_steps=5,
                         check_every=5, final_fit_steps=300, final_fit_lr=3e-3)
    assert final_fit(model, config, 0) == {}
    base = sample(model, RolloutInputs.draw(0, 256, 8, (2,), {"y": 2}), from_reference=True)
    log_targets = torch.stack([-torch.nn.functional.softplus(-3 * base.x0[:, 0] * s)
                               for s in (1.0, -1.0)], 1)
    payload = {"states": base.states, "log_targets": log_targets, "contexts": None}
    online = learner_step(model, make_optimizer(model, config), [payload], config,
                          torch.Generator().manual_seed(0), 0)
    final = final_fit(model, config, 0)
    assert final["final_fit_heldout_loss"] < online["heldout_loss"] - 0.01, (online, final)
    assert final["final_fit_kept_steps"] > 0
    assert final_fit(model, dataclasses.replace(config, final_fit_steps=0), 0) == {}


def test_an_untrained_head_reports_its_base_rollouts_as_the_policys(monkeypatch):
    """While the head is flat the policy is the base, so a report takes the base rollouts'
    reward and a KL of zero instead of sampling again; once it is not, the policy is sampled."""
    from ctrl_ray.objectives import value
    from ctrl_ray.objectives.value import ValueConfig, worker_step

    calls = []
    monkeypatch.setattr(value, "sample", lambda *a, **k: calls.append(1) or sample(*a, **k))

    def reward_fn(x0, labels, contexts):
        return -torch.nn.functional.softplus(-x0[:, 0] * (2.0 * labels["y"] - 1.0))

    torch.manual_seed(0)
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    inputs = RolloutInputs.draw(0, 32, 8, (2,), {"y": 2})
    config = ValueConfig(batch_size=32, num_inference_steps=8)
    for trained in (False, True):
        if trained:
            torch.nn.init.normal_(model.value_head.head.weight, std=0.5)
        else:   # a bias only shifts log h by a constant: the head is still flat
            torch.nn.init.normal_(model.value_head.head.bias, std=0.5)
        assert model.value_head.is_flat() is not trained
        calls.clear()
        _, report = worker_step(model, reward_fn, inputs, config, 32, 0)
        assert len(calls) == 1 + trained   # the base's rollouts, and the policy's if trained
        with torch.no_grad():
            policy = sample(model, inputs, eta=config.eta)
        assert report["reward"] == pytest.approx(
            reward_fn(policy.x0, policy.labels, None).mean().item(), abs=1e-6)
        assert report["kl"] == pytest.approx(policy.path_kl.mean().item(), abs=1e-6)
        assert (report["kl"] > 1e-3) is trained


def _mixture_payload() -> tuple[AugmentedModel, dict]:
    """A fresh value policy on the mixture and a payload of 64 of its base rollouts (8 steps,
    2 targets), as a worker ships them."""
    inputs = RolloutInputs.draw(0, 64, 8, (2,), {"y": 2})
    torch.manual_seed(0)
    model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
    base = sample(model, inputs, from_reference=True)
    log_targets = torch.stack([-torch.nn.functional.softplus(-base.x0[:, 0] * s)
                               for s in (1.0, -1.0)], 1)
    payload = {"states": base.states, "log_targets": log_targets, "contexts": None}
    return model, payload


def test_check_patience_ends_a_fit_that_only_gets_worse():
    """With a learning rate that wrecks the fit every check is worse than the weights the head
    came in with: `check_patience: 1` stops after the first check, 2 after the second, 0 runs
    every step, and each leaves the head it came in with."""
    from ctrl_ray.objectives.base import make_optimizer
    from ctrl_ray.objectives.value import ValueConfig, learner_step

    model, payload = _mixture_payload()
    before = {k: v.clone() for k, v in model.value_head.state_dict().items()}
    for patience, steps in ((1, 5), (2, 10), (0, 20)):
        config = ValueConfig(batch_size=64, num_inference_steps=8, regression_steps=20,
                             check_every=5, lr_adapter=50.0, max_grad_norm=None,
                             check_patience=patience)
        metrics = learner_step(model, make_optimizer(model, config), [payload], config,
                               torch.Generator().manual_seed(0), 0)
        assert metrics["head_steps"] == steps and metrics["kept_steps"] == 0, (patience, metrics)
        after = model.value_head.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InputError, match="check_patience"):
        ValueConfig(check_patience=-1)


def _one_learner_step(**settings) -> tuple[dict, float]:
    """The value head after one learner step on 64 mixture rollouts (8 steps, 2 targets) with
    `settings` of ValueConfig, and the held-out loss it reports."""
    from ctrl_ray.objectives.base import make_optimizer
    from ctrl_ray.objectives.value import ValueConfig, learner_step

    model, payload = _mixture_payload()
    config = ValueConfig(batch_size=64, num_inference_steps=8, check_every=10, lr_adapter=3e-3,
                         **settings)
    metrics = learner_step(model, make_optimizer(model, config), [payload], config,
                           torch.Generator().manual_seed(0), 3)
    return model.value_head.state_dict(), metrics["heldout_loss"]


def test_the_held_out_check_in_bf16_measures_the_fp32_loss_and_keeps_the_same_weights():
    """`check_bf16` runs only the check's forward passes under bf16 autocast (where the CPU has
    it natively; elsewhere the check stays fp32): the checked loss is fp32's within 1%, and
    the fit, which stays in fp32, ends on the same weights."""
    from ctrl_ray.objectives.value import native_bf16

    (end32, loss32), (end16, loss16) = (_one_learner_step(regression_steps=20, check_bf16=b)
                                        for b in (False, True))
    assert all(torch.equal(end32[k], end16[k]) for k in end32)
    assert abs(loss16 - loss32) < 0.01 * abs(loss32)
    if native_bf16(torch.device("cpu")):
        assert loss16 != loss32   # the check did run in bf16
    else:
        assert loss16 == loss32


def test_a_smaller_held_out_check_reads_fewer_pairs_and_leaves_the_fit_draws_alone():
    """`heldout_pairs` subsamples the check's (state, timestep) pairs from the version's own
    generator: the fit draws the same minibatches, so where every check accepts the head ends
    identical, while the checked loss is a different (smaller) sample's."""
    (end_all, loss_all), (end_some, loss_some) = (
        _one_learner_step(regression_steps=10, heldout_pairs=pairs) for pairs in (0, 24))
    # 8 of 64 rollouts held out, 9 states each: 72 pairs, of which the check reads 24
    assert all(torch.equal(end_all[k], end_some[k]) for k in end_all)
    assert abs(loss_all - loss_some) > 1e-6


def test_forward_noised_states_are_drawn_from_their_rollouts_x0():
    """`forward_noised` keeps the chain's states at fraction 0, and at fraction 1 draws each
    from q(x_t | x_0) of its own rollout: the implied noise is standard normal, and x_0 (a = 1)
    is the sample itself."""
    from ctrl_ray.objectives.value import forward_noised

    steps, count = 4, 8
    states = torch.randn(steps + 1, count, 2)
    alphas = torch.tensor([0.1, 0.4, 0.7, 0.9, 1.0])
    rows = torch.arange(count).repeat(512)
    which = torch.arange(steps + 1).repeat_interleave(count * 512 // (steps + 1) + 1)[:len(rows)]
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(forward_noised(states, rows, which, alphas, 0.0, generator),
                       states[which, rows])
    fresh = forward_noised(states, rows, which, alphas, 1.0, generator)
    last = which == steps
    assert torch.equal(fresh[last], states[-1, rows[last]])
    a = alphas[which[~last]].view(-1, 1)
    noise = (fresh[~last] - a.sqrt() * states[-1, rows[~last]]) / (1 - a).sqrt()
    assert noise.mean().abs() < 0.05 and (noise.std() - 1).abs() < 0.05
    half = forward_noised(states, rows, which, alphas, 0.5, generator)
    kept = (half == states[which, rows]).all(1)[~last].float().mean()
    assert 0.45 < kept < 0.55
    per_state = forward_noised(states, rows, which, alphas,
                               torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]), generator)
    first = which == 0                  # a fraction per state index: x_T stays the chain's
    assert torch.equal(per_state[first], states[0, rows[first]])
    assert not (per_state == states[which, rows]).all(1)[~first & ~last].any()


def test_a_head_fit_on_forward_noised_states_learns_the_chains_value():
    """On the mixture, whose base is exact, a head fit only on forward-noised states of 256
    rollouts scores on the chain's held-out states about as well as one fit on the chain's own
    states, and far better than the flat head it starts from."""
    from ctrl_ray.objectives.base import make_optimizer
    from ctrl_ray.objectives.value import ValueConfig, learner_step

    losses = {}
    for fraction in (0.0, 1.0):
        torch.manual_seed(0)
        model = AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value")
        base = sample(model, RolloutInputs.draw(0, 256, 8, (2,), {"y": 2}), from_reference=True)
        log_targets = torch.stack([-torch.nn.functional.softplus(-3 * base.x0[:, 0] * s)
                                   for s in (1.0, -1.0)], 1)
        payload = {"states": base.states, "log_targets": log_targets, "contexts": None}
        config = ValueConfig(batch_size=256, num_inference_steps=8, regression_steps=300,
                             check_every=10, lr_adapter=3e-3, forward_noise_fraction=fraction)
        metrics = learner_step(model, make_optimizer(model, config), [payload], config,
                               torch.Generator().manual_seed(0), 0)
        losses[fraction] = (metrics["heldout_loss_before"], metrics["heldout_loss"])
    (flat, chain), (_, forward) = losses[0.0], losses[1.0]
    assert forward < flat - 0.1 and abs(forward - chain) < 0.05, losses
    with pytest.raises(InputError, match="forward_noise_fraction"):
        ValueConfig(forward_noise_fraction=1.5)


def test_a_target_power_fits_a_tempered_value_and_steers_by_its_log_over_the_power():
    """With target_power f the worker's targets are f lambda log p, the head's log h is what it
    fits divided by f (so the step, the x_T tilt and the candidates' weights all read it), and a
    saved policy keeps f."""
    from test_theorem import STEPS, classifier_log_likelihood

    from ctrl_ray.checkpoint import policy_spec
    from ctrl_ray.objectives import value
    from ctrl_ray.objectives.configs import ValueConfig

    nets = twin_heads("target_power", 1.0, 0.5)
    x, t, labels = torch.tensor([[0.3, -0.2]]), torch.full((1,), 400), {"y": torch.tensor([1])}
    plain, tempered = (net.log_value(x, t, None, labels)[0] for net in nets)
    torch.testing.assert_close(tempered, 2 * plain)
    plain, tempered = (net.mean_shift(x, torch.tensor(0.5), t, None, labels, None)
                       for net in nets)
    assert plain.norm() > 1e-3
    torch.testing.assert_close(tempered, 2 * plain)
    with pytest.raises(InputError, match="target_power"):
        SoftValueSpec([2], {"y": 2}, target_power=0)

    models = [AugmentedModel(mixture_backbone(), {"y": 2}, adapter="value",
                             value_head={"target_power": power}) for power in (1.0, 0.25)]
    inputs = RolloutInputs.draw(0, 8, STEPS, (2,), {"y": 2})
    config = ValueConfig(gamma=2.0, kl_weight=1.0, num_inference_steps=STEPS)
    plain, tempered = (value.worker_step(model, classifier_log_likelihood, inputs, config, 8, 0,
                                         report=False)[0]["log_targets"] for model in models)
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(tempered, 0.25 * plain)
    spec = policy_spec(models[1], {}, {}, "base", 4, None, None)
    assert spec["value_head"]["target_power"] == 0.25
