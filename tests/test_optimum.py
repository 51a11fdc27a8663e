"""The exact-optimum yardstick: importance weighting of base samples matches the closed-form
tilted posterior on the analytic mixture, and `ctrl-ray reward audit` reports it end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from test_theorem import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, MEANS, WEIGHTS, mixture_backbone

from ctrl_ray.cli import main
from ctrl_ray.optimum import (
    BASE_ROW,
    SamplePool,
    against_optimum,
    format_against_optimum,
    format_optimum,
    keep_the_larger_ess,
    optimum_at,
    rare_pairs,
    rescored,
    tilted_weights,
    weights_kl_and_ess,
)

VARIANCE = 0.12


def closed_form(y: int, tilt: float) -> dict[str, float]:
    """P(x_1 > 0), E[x_1] and KL to p_pre of p_pre(x) p(y | x)^tilt / Z, by quadrature: the
    classifier reads x_1 only, so the first coordinate's mixture marginal is all it takes."""
    x = np.linspace(-6, 6, 200_001)
    density = sum(w * np.exp(-(x - m[0]) ** 2 / (2 * VARIANCE)) / math.sqrt(2 * math.pi * VARIANCE)
                  for w, m in zip(WEIGHTS, MEANS, strict=True))
    logits = float(CLASSIFIER_WEIGHT[0]) * x + CLASSIFIER_BIAS
    likelihood = 1 / (1 + np.exp(-logits if y == 1 else logits))
    tilted = density * likelihood**tilt
    z = np.trapezoid(tilted, x)
    posterior = tilted / z
    return {"p_positive": float(np.trapezoid(posterior * (x > 0), x)),
            "mean": float(np.trapezoid(posterior * x, x)),
            "kl": float(np.trapezoid(posterior * np.log(likelihood**tilt / z), x)),
            "log_z": math.log(z),
            "base_kl": float(np.trapezoid(density * (math.log(z) - tilt * np.log(likelihood)),
                                          x))}


@pytest.fixture(scope="module")
def mixture_pool() -> tuple[SamplePool, torch.Tensor]:
    """20,000 exact samples of the mixture, labelled by the sign of x_1 (the 'oracle'), and
    the samples themselves."""
    x = mixture_backbone().sample(20_000, generator=torch.Generator().manual_seed(0)).double()
    logits = (x @ CLASSIFIER_WEIGHT.double() + CLASSIFIER_BIAS).numpy()
    log_likelihood = {(0,): -np.logaddexp(0, logits), (1,): -np.logaddexp(0, -logits)}
    return SamplePool(contexts=[0], context_of_row=np.zeros(len(x), dtype=int),
                    images=x, labels={"y": (x[:, 0] > 0).long().numpy()}, judged_digits=None,
                    log_likelihood=log_likelihood, scorers={"y": "sign of x_1"}), x


def test_base_samples_are_rescored_by_another_reward(mixture_pool):
    """Another reward's estimate starts from the same base samples, each target's log p(y | x)
    now the other reward's; a proposal's rows, drawn for one reward's targets, are refused."""
    from types import SimpleNamespace

    from ctrl_ray.optimum_config import OptimumConfig

    pool, x = mixture_pool
    before = {target: values.copy() for target, values in pool.log_likelihood.items()}

    def sharper(images, labels, contexts):
        logits = 2 * (images @ CLASSIFIER_WEIGHT.double() + CLASSIFIER_BIAS)
        return torch.where(labels["y"] == 1, -torch.nn.functional.softplus(-logits),
                           -torch.nn.functional.softplus(logits))

    model = SimpleNamespace(num_contexts=0, label_classes={"y": 2})
    again = rescored(pool, model, sharper, OptimumConfig(batch_size=3000))
    logits = 2 * (x @ CLASSIFIER_WEIGHT.double() + CLASSIFIER_BIAS).numpy()
    assert np.allclose(again.log_likelihood[(1,)], -np.logaddexp(0, -logits), atol=1e-9)
    assert np.allclose(again.log_likelihood[(0,)], -np.logaddexp(0, logits), atol=1e-9)
    assert again.images is pool.images and np.array_equal(again.labels["y"], pool.labels["y"])
    assert all(np.array_equal(pool.log_likelihood[t], before[t]) for t in before)
    drawn = SamplePool(**{**pool.__dict__, "log_ratio": np.zeros(len(x)),
                          "target_of_row": np.zeros(len(x), dtype=int)})
    with pytest.raises(ValueError, match="only base samples"):
        rescored(drawn, model, sharper, OptimumConfig())
    with pytest.raises(ValueError, match="same labels"):
        rescored(pool, SimpleNamespace(num_contexts=0, label_classes={"ink": 2}), sharper,
                 OptimumConfig())


@pytest.mark.parametrize("tilt", [1.0, 3.0])
def test_weighted_base_samples_match_the_closed_form_posterior(mixture_pool, tilt):
    pool, x = mixture_pool
    report = optimum_at(pool, {"y": {"num_classes": 2}}, tilt)
    kls = []
    for y in (0, 1):
        exact = closed_form(y, tilt)
        weights = tilted_weights(pool.log_likelihood[(y,)], tilt)
        kl, ess = weights_kl_and_ess(weights)
        assert ess > 2_000
        assert abs(kl - exact["kl"]) < 0.03, (y, kl, exact)
        assert abs(float(weights @ x[:, 0].numpy()) - exact["mean"]) < 0.03
        kls.append(exact["kl"])
    # The labels are x_1 > 0: for target y = 1 the optimum is "correct" with P(x_1 > 0 | y = 1),
    # for y = 0 with P(x_1 <= 0 | y = 0); accuracy averages the two targets.
    expected_accuracy = (closed_form(1, tilt)["p_positive"]
                         + 1 - closed_form(0, tilt)["p_positive"]) / 2
    assert abs(report["accuracy"] - expected_accuracy) < 0.02
    assert abs(report["kl"] - np.mean(kls)) < 0.03
    assert report["ess_min"] > 2_000
    # J* / kl_weight = log Z, the optimum's tilt E[log p] - KL
    assert abs(report["objective"] - np.mean([closed_form(y, tilt)["log_z"] for y in (0, 1)])) \
        < 0.01
    assert report["objective"] == pytest.approx(
        tilt * report["expected_reward"] - report["kl"], abs=1e-9)


@pytest.mark.parametrize("tilt", [1.0, 3.0])
def test_the_distance_to_the_optimum_is_kl_to_it(mixture_pool, tilt):
    """J* - J over kl_weight is KL(pi || pi*): zero for the optimum itself, and for the base
    model KL(p_pre || p_pre p^tilt / Z) = log Z - tilt E_pre[log p], by quadrature."""
    pool, _ = mixture_pool
    label_info = {"y": {"num_classes": 2}}
    optimum, base = optimum_at(pool, label_info, tilt), optimum_at(pool, label_info, 0.0)

    def policy(report: dict) -> dict:
        return {"labels": report["labels"], "mean_kl": report["kl"],
                "expected_reward": report["expected_reward"]}

    itself = against_optimum(policy(optimum), optimum, base)["kl_to_optimum"]
    assert itself == pytest.approx(0.0, abs=1e-9)
    base_model = against_optimum(policy(base), optimum, base)["kl_to_optimum"]
    exact = np.mean([closed_form(y, tilt)["base_kl"] for y in (0, 1)])
    assert abs(base_model - exact) < 0.02 * exact + 0.01 and exact > 0.1, (base_model, exact)
    assert f"KL(pi || pi*): {base_model:.3f} nats" in format_against_optimum(
        against_optimum(policy(base), optimum, base), ["y"])


@pytest.mark.parametrize("tilt", [1.0, 3.0])
def test_a_proposals_weighted_samples_match_the_closed_form_posterior(tilt):
    """Each target's samples from its own broad Gaussian, weighted by p^tilt p_pre / q."""
    backbone = mixture_backbone()
    rows, targets, log_ratios, images = [], [], [], []
    torch.manual_seed(1)
    for y, centre in ((0, -0.5), (1, 0.5)):
        q = torch.distributions.MultivariateNormal(torch.tensor([centre, 0.0]).double(),
                                                   1.5 * torch.eye(2).double())
        x = q.sample((20_000,))
        with torch.no_grad():
            log_ratios.append((q.log_prob(x) - backbone.log_prob(x.float()).double()).numpy())
        images.append(x)
        targets.append(np.full(len(x), y))
        rows.append(np.zeros(len(x), dtype=int))
    x = torch.cat(images)
    logits = (x @ CLASSIFIER_WEIGHT.double() + CLASSIFIER_BIAS).numpy()
    pool = SamplePool(contexts=[0], context_of_row=np.concatenate(rows), images=x,
                      labels={"y": (x[:, 0] > 0).long().numpy()}, judged_digits=None,
                      log_likelihood={(0,): -np.logaddexp(0, logits),
                                      (1,): -np.logaddexp(0, -logits)},
                      scorers={"y": "sign of x_1"}, log_ratio=np.concatenate(log_ratios),
                      target_of_row=np.concatenate(targets))
    report = optimum_at(pool, {"y": {"num_classes": 2}}, tilt)
    expected_accuracy = (closed_form(1, tilt)["p_positive"]
                         + 1 - closed_form(0, tilt)["p_positive"]) / 2
    assert report["ess_min"] > 1_000
    assert abs(report["accuracy"] - expected_accuracy) < 0.03
    assert abs(report["kl"] - np.mean([closed_form(y, tilt)["kl"] for y in (0, 1)])) < 0.05


def hybrid_pool(x_base: torch.Tensor, x_proposal: torch.Tensor,
                log_ratio: np.ndarray) -> SamplePool:
    """Base samples serving every target, and a proposal's samples drawn for target 1."""
    x = torch.cat([x_base, x_proposal])
    logits = (x @ CLASSIFIER_WEIGHT.double() + CLASSIFIER_BIAS).numpy()
    return SamplePool(contexts=[0], context_of_row=np.zeros(len(x), dtype=int), images=x,
                      labels={"y": (x[:, 0] > 0).long().numpy()}, judged_digits=None,
                      log_likelihood={(0,): -np.logaddexp(0, logits),
                                      (1,): -np.logaddexp(0, -logits)},
                      scorers={"y": "sign of x_1"},
                      log_ratio=np.concatenate([np.zeros(len(x_base)), log_ratio]),
                      target_of_row=np.concatenate([np.full(len(x_base), BASE_ROW),
                                                    np.ones(len(x_proposal), dtype=int)]))


def test_a_proposal_for_the_short_pair_alone_joins_the_base_samples(mixture_pool):
    """Base samples serve every target but the one a proposal's rows were drawn for, which its
    own rows serve, weighted by p^tilt p_pre / q: both targets match the closed form, and the
    base's rarity is read off the base rows alone."""
    base, x_base = mixture_pool
    torch.manual_seed(2)
    q = torch.distributions.MultivariateNormal(torch.tensor([0.5, 0.0]).double(),
                                               1.5 * torch.eye(2).double())
    x_q = q.sample((20_000,))
    with torch.no_grad():
        log_ratio = (q.log_prob(x_q) - mixture_backbone().log_prob(x_q.float()).double()).numpy()
    pool = hybrid_pool(x_base, x_q, log_ratio)
    assert (pool.rows(0, 0) < len(x_base)).all() and len(pool.rows(0, 0)) == len(x_base)
    assert (pool.rows(0, 1) >= len(x_base)).all() and len(pool.rows(0, 1)) == len(x_q)
    tilt = 3.0
    report = optimum_at(pool, {"y": {"num_classes": 2}}, tilt)
    expected_accuracy = (closed_form(1, tilt)["p_positive"]
                         + 1 - closed_form(0, tilt)["p_positive"]) / 2
    assert abs(report["accuracy"] - expected_accuracy) < 0.03
    assert abs(report["kl"] - np.mean([closed_form(y, tilt)["kl"] for y in (0, 1)])) < 0.05
    assert rare_pairs(pool, below=0.0, count=5) == rare_pairs(base, below=0.0, count=5)
    # Which rows serve the pair: the broad q's over 40 base samples, 40 base samples over a
    # proposal that misses the pair's optimum (narrow, far on the wrong side).
    bad = torch.distributions.MultivariateNormal(torch.tensor([-2.0, 0.0]).double(),
                                                 0.05 * torch.eye(2).double())
    x_bad = bad.sample((2_000,))
    with torch.no_grad():
        bad_ratio = (bad.log_prob(x_bad)
                     - mixture_backbone().log_prob(x_bad.float()).double()).numpy()
    for x_proposal, ratio, kept in ((x_q, log_ratio, [(0, 1)]), (x_bad, bad_ratio, [])):
        pool = hybrid_pool(x_base[:40], x_proposal, ratio)
        assert keep_the_larger_ess(pool, [(0, 1)], [tilt]) == kept
        assert (len(pool.rows(0, 1)) == 40) == (not kept)
        assert pool.base_rows().sum() == 40


def test_a_pools_rows_save_load_and_join(mixture_pool, tmp_path):
    """A pool written and read back is the same pool; joining a proposal's rows to base rows
    marks the base rows as serving every target."""
    base, x = mixture_pool
    pool = hybrid_pool(x[:30], x[30:50], np.linspace(-1, 1, 20))
    pool.save(tmp_path / "pool.npz")
    loaded = SamplePool.load(tmp_path / "pool.npz")
    for name in ("context_of_row", "log_ratio", "target_of_row"):
        assert np.array_equal(getattr(loaded, name), getattr(pool, name))
    assert torch.equal(loaded.images, pool.images) and loaded.contexts == pool.contexts
    assert loaded.log_likelihood.keys() == pool.log_likelihood.keys()
    assert all(np.array_equal(loaded.log_likelihood[t], pool.log_likelihood[t])
               for t in pool.log_likelihood)
    assert np.array_equal(loaded.labels["y"], pool.labels["y"])
    assert loaded.scorers == pool.scorers and loaded.judged_digits is None
    joined = hybrid_pool(x[:0], x[:0], np.zeros(0))
    joined.log_ratio = joined.target_of_row = None
    joined.extend(SamplePool(contexts=[0], context_of_row=base.context_of_row[:30],
                             images=x[:30], labels={"y": base.labels["y"][:30]},
                             judged_digits=None,
                             log_likelihood={t: v[:30] for t, v in base.log_likelihood.items()},
                             scorers=base.scorers))
    assert joined.log_ratio is None   # base rows only, so far
    proposal = hybrid_pool(x[:0], x[30:50], np.linspace(-1, 1, 20))
    joined.extend(proposal)
    for name in ("context_of_row", "log_ratio", "target_of_row"):
        assert np.array_equal(getattr(joined, name), getattr(pool, name))
    assert all(np.array_equal(joined.log_likelihood[t], pool.log_likelihood[t])
               for t in pool.log_likelihood)


def test_a_short_pairs_policy_samples_top_up_resume_grow_and_draw_apart(tiny_run, tiny_base,
                                                                          tiny_reward, tiny_judge,
                                                                          tmp_path, monkeypatch):
    """A pair still short after `short_pair_samples` of the policy takes more, up to its cap;
    what was drawn is kept in the cache and taken from there (continued under a larger cap, or
    after a stop part-way), and one pair drawn alone (as another process would) has the same
    samples as in the joint estimate."""
    from ctrl_ray import optimum
    from ctrl_ray.config import load_config
    from ctrl_ray.finetune import FinetuneConfig
    from ctrl_ray.finetune_setup import build_setup
    from ctrl_ray.models.judge import DigitJudge
    from ctrl_ray.optimum import PoolCache, exact_optimum, pair_pool
    from ctrl_ray.optimum_config import OptimumConfig
    from ctrl_ray.policy import load_any

    setup = build_setup(load_config(FinetuneConfig, overrides=[
        f"base_model={tiny_base.model_dir}", f"rewards=[{{path: {tiny_reward}}}]",
        f"judge={tiny_judge}"]))
    setup.model.eval()
    policy = load_any(tiny_run[0] / "policy").model.eval()
    judge = DigitJudge.load(tiny_judge)
    config = OptimumConfig(samples_per_context=6, short_pair_samples=4,
                           max_short_pair_samples=10, contexts=[0, 1], guidance_levels=[3.0],
                           num_inference_steps=4)
    cache = PoolCache(tmp_path)
    result = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                           config, proposal=policy, cache=cache)
    pairs = sorted(tmp_path.glob("pair-*.npz"))
    assert (tmp_path / "base.npz").is_file() and len(pairs) == 8   # 2 contexts x 4 targets
    # 10 samples cannot give an ESS of 50: 4, then the proportional ask, capped at 10
    assert all(len(SamplePool.load(path).context_of_row) == 10 for path in pairs)
    assert all(pair["samples"] == 10 for pair in result["short_pairs"])
    saved = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.npz")}

    again = exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge,
                          config, proposal=policy, cache=PoolCache(tmp_path))
    assert again["levels"] == result["levels"]
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.npz")} == saved
    cached = SamplePool.load(tmp_path / "pair-1-2.npz")
    alone = pair_pool(policy, setup.label_info, setup.image_log_likelihood, judge, config, 1, 2)
    assert np.array_equal(alone.log_ratio, cached.log_ratio)
    assert np.array_equal(alone.log_likelihood[(2,)], cached.log_likelihood[(2,)])

    # a larger cap continues each pair from its saved rows: as if drawn under it at once
    larger = dataclasses.replace(config, max_short_pair_samples=14)
    exact_optimum(setup.model, setup.label_info, setup.image_log_likelihood, judge, larger,
                  proposal=policy, cache=cache)
    grown = SamplePool.load(tmp_path / "pair-1-2.npz")
    at_once = pair_pool(policy, setup.label_info, setup.image_log_likelihood, judge, larger,
                        1, 2)
    assert len(grown.context_of_row) == len(at_once.context_of_row) == 14
    assert np.array_equal(grown.log_ratio[:10], cached.log_ratio)
    assert np.allclose(grown.log_ratio, at_once.log_ratio, rtol=0, atol=1e-3)
    assert np.allclose(grown.log_likelihood[(2,)], at_once.log_likelihood[(2,)], rtol=0,
                       atol=1e-3)

    # a draw stopped part-way keeps the pieces it finished, and resumes from them
    monkeypatch.setattr(optimum, "PROGRESS_ROWS", 3)
    stopped = PoolCache(tmp_path / "stopped")

    def draw(saved, keep, stop_after: int | None = None) -> SamplePool:
        def keep_then_stop(pool: SamplePool) -> None:
            keep(pool)
            if len(pool.context_of_row) >= stop_after:
                raise KeyboardInterrupt
        return pair_pool(policy, setup.label_info, setup.image_log_likelihood, judge, larger,
                         1, 2, start=saved, keep=keep if stop_after is None else keep_then_stop)

    with pytest.raises(KeyboardInterrupt):
        stopped.get("pair-1-2", lambda saved, keep: draw(saved, keep, stop_after=5))
    # the first 4 in pieces of 3 and 1, then the top-up's first piece of 3: stopped at 7
    assert len(SamplePool.load(tmp_path / "stopped" / "pair-1-2.npz").context_of_row) == 7
    resumed = stopped.get("pair-1-2", draw)
    assert len(resumed.context_of_row) == 14
    assert np.allclose(resumed.log_ratio, at_once.log_ratio, rtol=0, atol=1e-3)


def test_a_pool_another_process_is_drawing_is_waited_for_not_drawn_again(mixture_pool,
                                                                        tmp_path):
    """A claim by a live process makes the cache wait for its file; a claim left by a process
    that is gone does not."""
    import subprocess
    import threading

    from ctrl_ray.optimum import PoolCache

    pool, _ = mixture_pool
    cache = PoolCache(tmp_path, poll_seconds=0.05)
    other = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / ".base.drawing").write_text(str(other.pid))
        def finish() -> None:   # the other process's save (whole, then renamed in), its claim gone
            pool.save(tmp_path / ".base.npz.partial")
            (tmp_path / ".base.npz.partial").replace(tmp_path / "base.npz")
            (tmp_path / ".base.drawing").unlink()

        threading.Timer(0.5, finish).start()

        def kept(saved: SamplePool | None, keep) -> SamplePool:
            assert saved is not None, "drawn while another process draws it"
            return saved

        waited = cache.get("base", kept)
        assert np.array_equal(waited.context_of_row, pool.context_of_row)
    finally:
        other.kill()
        other.wait()
    (tmp_path / ".pair-0-1.drawing").write_text(str(other.pid))   # gone now
    drawn = cache.get("pair-0-1", lambda saved, keep: pool)
    assert drawn is pool and (tmp_path / "pair-0-1.npz").is_file()
    assert not (tmp_path / ".pair-0-1.drawing").exists()


def test_the_rarest_pairs_are_those_the_base_makes_least_often(mixture_pool):
    """log E_pre[p(y | x)] per (context, target), rarest first, matches the closed form's log Z
    at tilt 1; only pairs below the bound are listed, and the audit's table names them."""
    pool, _ = mixture_pool
    pairs = rare_pairs(pool, below=0.0, count=5)
    exact = sorted((closed_form(y, 1.0)["log_z"], y) for y in (0, 1))
    assert [pair[1] for pair in pairs] == [(y,) for _, y in exact]
    for (_, _, log_z), (expected, _) in zip(pairs, exact, strict=True):
        assert log_z == pytest.approx(expected, abs=0.02)
    assert rare_pairs(pool, below=exact[0][0] - 0.1) == []
    level = {"labels": {"y": {"macro_f1": 0.5}}, "joint_accuracy": 0.5,
             "expected_reward": -0.7, "kl": 0.0, "ess_min": 100.0}
    result = {"base": level, "levels": [], "samples_per_context": 10, "num_inference_steps": 4,
              "min_ess": 50, "rare_pairs": [{"context": "c = 7", "target": "y: 1",
                                             "log_z": math.log(1 / 2700)}]}
    assert "c = 7 / y: 1: 1 in 2,700" in format_optimum(result)
    assert "rare" not in format_optimum({**result, "rare_pairs": []})


def test_flat_weights_are_the_base_with_zero_kl(mixture_pool):
    pool, _ = mixture_pool
    report = optimum_at(pool, {"y": {"num_classes": 2}}, 0.0)
    assert report["kl"] == pytest.approx(0.0, abs=1e-9)
    assert report["ess_min"] == pytest.approx(20_000)


def test_a_policy_is_read_against_the_optimum_in_score_kl_and_control_per_nat():
    def report(f1: float, kl: float) -> dict:
        return {"labels": {"ink": {"macro_f1": f1}}, "mean_kl": kl, "kl": kl}

    comparison = against_optimum(report(0.75, 1.5), report(0.95, 1.25), report(0.25, 0.0))
    assert comparison["ink_score_ratio"] == pytest.approx(0.75 / 0.95)
    assert comparison["kl_ratio"] == pytest.approx(1.2)
    assert comparison["ink_per_nat"] == pytest.approx(0.5 / 1.5)
    assert comparison["ink_optimum_per_nat"] == pytest.approx(0.7 / 1.25)
    assert "score 0.79x  KL 1.20x  control per nat 0.333 (optimum 0.560)" in \
        format_against_optimum(comparison, ["ink"])


def test_reward_audit_cli_reports_the_optimum(tiny_base, tiny_reward, tiny_judge, tmp_path,
                                              capsys):
    out = tmp_path / "audit"
    args = ["reward", "audit", "--base", str(tiny_base.model_dir), "--reward", str(tiny_reward),
            "--judge", str(tiny_judge), "--guidance-levels", "1,10,1000", "--samples", "12",
            "--steps", "4", "--out", str(out), "--set", "optimum.contexts=[0, 1]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exact optimum" in printed and "gamma/alpha" in printed
    assert "warning: at gamma/alpha 1000" in printed  # 12 samples cannot carry that tilt
    result = json.loads((out / "audit.json").read_text())
    assert (out / "optimum_grid.png").is_file()
    base, levels = result["base"], result["levels"]
    assert base["kl"] == pytest.approx(0.0, abs=1e-9)
    assert [level["gamma_over_alpha"] for level in levels] == [1.0, 10.0, 1000.0]
    assert 0 < levels[0]["kl"] < levels[1]["kl"] <= math.log(12) + 1e-9
    assert levels[0]["expected_reward"] > base["expected_reward"]
    assert levels[-1]["trustworthy"] is False and levels[0]["ess_min"] > levels[1]["ess_min"]
    # An existing audit is not replaced unasked.
    before = (out / "audit.json").read_bytes()
    assert main(args) == 2
    assert "output_dir" in capsys.readouterr().err
    assert (out / "audit.json").read_bytes() == before


def test_reward_audit_takes_prompts_as_contexts(trained_text_testbed, tiny_reward, tiny_judge,
                                                tmp_path):
    """On a text-to-image model the audit's contexts are prompts (one it never saw included),
    with the digit each names for the judge's fidelity."""
    out = tmp_path / "audit"
    assert main(["reward", "audit", "--base", str(trained_text_testbed), "--reward",
                 str(tiny_reward), "--judge", str(tiny_judge), "--guidance-levels", "1",
                 "--samples", "6", "--steps", "2", "--out", str(out), "--set",
                 "optimum.contexts=['a handwritten seven', 'a seven in green ink']",
                 "--set", "optimum.context_digits=[7, 7]"]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert len(result["contexts"]) == 2 and 0 <= result["levels"][0]["fidelity"] <= 1
    assert result["levels"][0]["kl"] > 0
