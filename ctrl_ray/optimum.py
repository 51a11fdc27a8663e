"""The exact optimum of CTRL's objective, without training: the yardstick for every policy.

The optimum of J = E[gamma log p(y | x0, c)] - alpha KL(P || P_pre) samples
p_pre(x | c) p(y | x, c)^(gamma / alpha). Self-normalised importance weighting of M base
samples per context c by p(y | x0, c)^(gamma / alpha) estimates it for every target y: the
weighted sample's labels (oracle, labeller or held-out judge), fidelity and reward are the
expectations a resample of it would give, its KL to the base is sum_i w_i log(M w_i) (the
limit of log M - H(w)), and the effective sample size 1 / sum_i w_i^2 says whether to trust
it. Base samples come from the same discretised sampler the policies use, so discretisation
error cancels.

Where the optimum sits where base samples rarely go (ESS < 50 from thousands of base samples),
a trained policy q can be the proposal instead (`proposal_pool`): M policy samples per target
(c, y), weighted by p(y | x0, c)^(gamma / alpha) p_pre(path) / q(path), the path ratio exact
from the sampler's Gaussian steps. Its KL to the base is E_w[(gamma / alpha) log p(y | x0, c)]
- log mean(p^(gamma / alpha) p_pre / q), which is the base pool's formula when q = p_pre. The
ESS still says how far to trust it, except about regions the proposal never visits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

from ctrl_ray.evaluation import (
    class_names,
    context_labels,
    judge_view,
    resolve_contexts,
    sample_rows,
    save_grid,
    target_labels,
)
from ctrl_ray.optimum_config import OptimumConfig
from ctrl_ray.scoring import get_scorer

# images (N, C, H, W), labels name -> (N,), contexts (N,) or None -> log p(y | x0, c), (N,)
ImageLogLikelihood = Callable[[torch.Tensor, dict, torch.Tensor | None], torch.Tensor]
BASE_ROW = -1   # `SamplePool.target_of_row` of a base sample among a proposal's: every target
SET_ASIDE = -2  # ... of a proposal's sample whose pair its base samples serve better


@dataclass
class SamplePool:
    """Samples per context: images, their labels by each label's scorer, the judge's digit and
    log p(y | x) for every target y (a tuple of classes, one per label). Base samples serve
    every target; a proposal's rows (`target_of_row`: the index of the target in
    `log_likelihood` each was drawn for) carry log q/p_pre of their path (`log_ratio`)."""

    contexts: list[int]
    context_of_row: np.ndarray                   # (N,)
    images: torch.Tensor                         # (N, C, H, W)
    labels: dict[str, np.ndarray]                # name -> (N,)
    judged_digits: np.ndarray | None             # (N,)
    log_likelihood: dict[tuple, np.ndarray]      # target -> (N,)
    scorers: dict[str, str]
    context_digits: dict[int, int] = field(default_factory=dict)   # context -> judged digit
    log_ratio: np.ndarray | None = None          # (N,) log q/p_pre of the path; None: base
    target_of_row: np.ndarray | None = None      # (N,) the proposal's target (BASE_ROW: every
                                                 # one); None: all rows are base samples

    def rows(self, context: int, target_index: int) -> np.ndarray:
        """The rows that sample the optimum of (context, target): the proposal's drawn for it
        where there are any, else the base samples of the context."""
        mask = self.context_of_row == context
        if self.target_of_row is not None:
            own = mask & (self.target_of_row == target_index)
            mask = own if own.any() else mask & (self.target_of_row == BASE_ROW)
        return np.flatnonzero(mask)

    def base_rows(self) -> np.ndarray:
        """Which rows are base samples (N,) bool."""
        return (np.ones(len(self.context_of_row), dtype=bool) if self.target_of_row is None
                else self.target_of_row == BASE_ROW)

    def log_weights(self, target: tuple, rows: np.ndarray, tilt: float) -> np.ndarray:
        """Unnormalised log weights of `rows` for the optimum of `target` at `tilt`."""
        logits = tilt * self.log_likelihood[target][rows]
        return logits if self.log_ratio is None else logits - self.log_ratio[rows]

    def extend(self, other: SamplePool) -> None:
        """Append `other`'s rows (same contexts and targets); a pool without `log_ratio` /
        `target_of_row` holds base samples."""
        def rows_of(pool: SamplePool, field_name: str, base_value) -> np.ndarray:
            value = getattr(pool, field_name)
            return np.full(len(pool.context_of_row), base_value) if value is None else value
        if other.log_ratio is not None or self.log_ratio is not None:
            self.log_ratio = np.concatenate([rows_of(self, "log_ratio", 0.0),
                                             rows_of(other, "log_ratio", 0.0)])
            self.target_of_row = np.concatenate([rows_of(self, "target_of_row", BASE_ROW),
                                                 rows_of(other, "target_of_row", BASE_ROW)])
        self.images = other.images if len(self.images) == 0 else torch.cat([self.images,
                                                                            other.images])
        for name, labels in other.labels.items():
            self.labels[name] = np.concatenate([self.labels.get(name, np.zeros(0, np.int64)),
                                                labels])
        for target, log_likelihood in other.log_likelihood.items():
            self.log_likelihood[target] = np.concatenate(
                [self.log_likelihood.get(target, np.zeros(0)), log_likelihood])
        if other.judged_digits is not None:
            self.judged_digits = (other.judged_digits if self.judged_digits is None
                                  else np.concatenate([self.judged_digits, other.judged_digits]))
        self.context_of_row = np.concatenate([self.context_of_row, other.context_of_row])

    def save(self, path: str | Path) -> None:
        """Write the pool to one .npz file (`load` reads it back), so that a long estimate can
        resume and a pair's samples can be drawn by another process."""
        targets = list(self.log_likelihood)
        arrays = {"context_of_row": self.context_of_row, "images": self.images.numpy(),
                  "targets": np.asarray(targets, dtype=np.int64),
                  "log_likelihood": np.stack([self.log_likelihood[t] for t in targets]),
                  "meta": np.asarray(json.dumps({
                      "contexts": self.contexts, "labels": list(self.labels),
                      "scorers": self.scorers,
                      "context_digits": [[c, d] for c, d in self.context_digits.items()]}))}
        arrays.update({f"labels_{i}": self.labels[name] for i, name in enumerate(self.labels)})
        for name in ("judged_digits", "log_ratio", "target_of_row"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:   # np.savez would add .npz to a name without it
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> SamplePool:
        """The pool `save` wrote."""
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            optional = {name: data[name] if name in data else None
                        for name in ("judged_digits", "log_ratio", "target_of_row")}
            return cls(contexts=meta["contexts"], context_of_row=data["context_of_row"],
                       images=torch.from_numpy(data["images"]),
                       labels={name: data[f"labels_{i}"]
                               for i, name in enumerate(meta["labels"])},
                       log_likelihood={tuple(int(k) for k in target): row for target, row
                                       in zip(data["targets"], data["log_likelihood"],
                                              strict=True)},
                       scorers=meta["scorers"],
                       context_digits={c: d for c, d in meta["context_digits"]}, **optional)


# log E_pre[p(y | x0, c)] below which a (context, target) pair counts as rare: 1 in 12 base
# samples, the bound below which slant's and centre_x's policies were furthest from the
# optimum (docs/update_rules.md, sections 20-21)
RARE_LOG_Z = -2.5


def base_pool(model, label_info: dict[str, dict], log_likelihood: ImageLogLikelihood, judge,
              config: OptimumConfig, start: SamplePool | None = None,
              keep: Callable[[SamplePool], None] | None = None) -> SamplePool:
    """Sample the base model M times per context and score every sample for every target; then
    top up each context whose ESS (at any target and guidance level) is below `min_ess`, by as
    many samples as the ESS asks for (it grows in proportion), up to `max_samples_per_context`.
    From a `start` pool (an earlier estimate's samples, kept), only what is missing is drawn;
    `keep(pool)` is called after every `PROGRESS_ROWS` samples (a long draw saves its progress)."""
    pool, scorers, judge = _empty_pool(model, label_info, judge, config)
    if start is not None:
        pool = start
    while more := _top_up(pool, config):
        _draw(pool, model, scorers, log_likelihood, judge,
              [c for c, count in more.items() for _ in range(count)], config.seed, config, keep)
    return pool


# samples drawn between two of a long draw's progress saves: whole batches of 256
PROGRESS_ROWS = 2048


def _draw(pool: SamplePool, model, scorers: dict, log_likelihood: ImageLogLikelihood, judge,
          rows: list[int], first_seed: int, config: OptimumConfig,
          keep: Callable[[SamplePool], None] | None, target: tuple | None = None) -> None:
    """`_add_samples` for `rows`, row i of the pool seeded `first_seed + i`, in pieces of
    `PROGRESS_ROWS` with `keep(pool)` after each."""
    for piece in range(0, len(rows), PROGRESS_ROWS):
        _add_samples(pool, model, scorers, log_likelihood, judge,
                     rows[piece:piece + PROGRESS_ROWS], first_seed + len(pool.context_of_row),
                     config, target=target)
        if keep is not None:
            keep(pool)


def _empty_pool(model, label_info: dict[str, dict], judge, config: OptimumConfig
                ) -> tuple[SamplePool, dict, object]:
    """A pool with no samples yet, each label's scorer, and the judge (None where the model
    has no contexts the judge can read)."""
    names = list(model.label_classes)
    scorers = {name: get_scorer(name, label_info[name], config.scorers.get(name))
               for name in names}
    contexts, context_digits = resolve_contexts(model, config.contexts, config.context_digits)
    judge = judge if model.num_contexts and context_digits is not None else None
    pool = SamplePool(contexts, np.zeros(0, dtype=np.int64), torch.zeros(0), {}, None, {},
                      {name: scorers[name].description for name in names},
                      dict(zip(contexts, context_digits or [], strict=False)))
    return pool, scorers, judge


def _add_samples(pool: SamplePool, model, scorers: dict, log_likelihood: ImageLogLikelihood,
                 judge, rows: list[int], first_seed: int, config: OptimumConfig,
                 target: tuple | None = None) -> None:
    """Draw one sample per entry of `rows` (its context; seeds from `first_seed` on), from the
    base, or from the policy `model` conditioned on `target` (with each path's log q/p_pre);
    score it for every target and append it to `pool`."""
    names = list(scorers)
    context_tensor = torch.tensor(rows) if model.num_contexts else None
    drawn_labels = {name: torch.full((len(rows),), 0 if target is None else k, dtype=torch.long)
                    for name, k in zip(names, target or [0] * len(names), strict=True)}
    images, log_ratios = [], []
    for trajectory in sample_rows(model, context_tensor, drawn_labels,
                                  [first_seed + i for i in range(len(rows))],
                                  num_inference_steps=config.num_inference_steps, eta=config.eta,
                                  from_reference=target is None, batch_size=config.batch_size,
                                  compute_log_ratio=target is not None):
        with torch.no_grad():
            images.append(model.decode(trajectory.x0).cpu())
        if target is not None:
            log_ratios.append(trajectory.path_log_ratio.double().cpu().numpy())
    images = torch.cat(images)
    drawn = SamplePool(pool.contexts, np.asarray(rows), images, {}, None, {}, pool.scorers)
    targets = list(itertools.product(*(range(model.label_classes[name]) for name in names)))
    drawn.log_likelihood = _scores(images, context_tensor, names, targets, log_likelihood,
                                   config.batch_size)
    if target is not None:
        drawn.log_ratio = np.concatenate(log_ratios)
        drawn.target_of_row = np.full(len(rows), list(drawn.log_likelihood).index(target))
    drawn.labels = {name: scorers[name].label(images) for name in names}
    if judge is not None:
        drawn.judged_digits = judge.predict(judge_view(images, judge))
    pool.extend(drawn)


def _scores(images: torch.Tensor, contexts: torch.Tensor | None, names: list[str],
            targets: list[tuple], log_likelihood: ImageLogLikelihood, batch_size: int
            ) -> dict[tuple, np.ndarray]:
    """log p(y | x, c) of every image for every target y (a tuple of classes, one per name)."""
    scores = {}
    with torch.no_grad():
        for each in targets:
            labels = {name: torch.full((len(images),), k, dtype=torch.long)
                      for name, k in zip(names, each, strict=True)}
            scores[each] = torch.cat([
                log_likelihood(images[i:i + batch_size],
                               {n: v[i:i + batch_size] for n, v in labels.items()},
                               None if contexts is None else contexts[i:i + batch_size]
                               ).double().cpu()
                for i in range(0, len(images), batch_size)]).numpy()
    return scores


def rescored(pool: SamplePool, model, log_likelihood: ImageLogLikelihood,
             config: OptimumConfig) -> SamplePool:
    """The base samples of `pool` scored by another reward for the same labels: a base sample
    does not depend on the reward, so a second reward's estimate (fewer training pairs, say)
    starts from the first's samples instead of drawing them again."""
    if not np.all(pool.base_rows()):
        raise ValueError("only base samples can be rescored: a proposal's rows were drawn "
                         "for one reward's targets")
    names = list(model.label_classes)
    if sorted(pool.labels) != sorted(names):
        raise ValueError(f"the samples carry the labels {sorted(pool.labels)}, the reward "
                         f"{sorted(names)}: rescore samples drawn for the same labels")
    contexts = torch.as_tensor(pool.context_of_row) if model.num_contexts else None
    targets = list(itertools.product(*(range(model.label_classes[name]) for name in names)))
    scores = _scores(pool.images, contexts, names, targets, log_likelihood, config.batch_size)
    return replace(pool, log_likelihood=scores)


def proposal_pool(policy, label_info: dict[str, dict], log_likelihood: ImageLogLikelihood,
                  judge, config: OptimumConfig) -> SamplePool:
    """`samples_per_context` samples of the policy per target and context, each with its
    path's log q/p_pre: the optimum's importance sample where base samples rarely reach it."""
    pool, scorers, judge = _empty_pool(policy, label_info, judge, config)
    targets = itertools.product(*(range(count) for count in policy.label_classes.values()))
    for index, target in enumerate(targets):
        rows = [c for c in pool.contexts for _ in range(config.samples_per_context)]
        _add_samples(pool, policy, scorers, log_likelihood, judge, rows,
                     config.seed + index * len(rows), config, target=target)
    return pool


def short_pairs(pool: SamplePool, config: OptimumConfig) -> list[tuple[int, int]]:
    """The (context, target index) pairs whose ESS at some guidance level is below `min_ess`."""
    return [(c, index) for index, target in enumerate(pool.log_likelihood)
            for c in pool.contexts
            if smallest_ess(pool, target, pool.rows(c, index), config.guidance_levels)
            < config.min_ess]


def smallest_ess(pool: SamplePool, target: tuple, rows: np.ndarray,
                 tilts: Sequence[float]) -> float:
    """The smallest ESS over `tilts` of the optimum's weights on `rows` for `target`."""
    return min(1.0 / (normalised(pool.log_weights(target, rows, tilt))**2).sum()
               for tilt in tilts)


def add_proposal_for_short_pairs(pool: SamplePool, proposal, label_info: dict[str, dict],
                                 log_likelihood: ImageLogLikelihood, judge,
                                 config: OptimumConfig, cache: PoolCache | None = None
                                 ) -> list[tuple[int, int]]:
    """Add the `proposal` policy's samples for each pair of the base `pool` whose ESS is still
    short (`pair_pool`); those rows then serve that pair, the base samples every other, unless
    the base samples' ESS is the larger there (`keep_the_larger_ess`). Returns the pairs the
    policy serves."""
    short = short_pairs(pool, config)
    if not short:
        return short
    pool.log_ratio = np.zeros(len(pool.context_of_row))
    pool.target_of_row = np.full(len(pool.context_of_row), BASE_ROW)
    for c, index in short:
        pool.extend(_cached(cache, f"pair-{c}-{index}", lambda saved, keep, c=c, index=index:
                            pair_pool(proposal, label_info, log_likelihood, judge, config, c,
                                      index, start=saved, keep=keep)))
    return keep_the_larger_ess(pool, short, config.guidance_levels)


# a (context, target) pair's proposal samples take seeds from config.seed + PAIR_SEEDS * (1 +
# the pair's number) on: more than any pool draws, so no pair shares a seed with another's
PAIR_SEEDS = 1_000_000


def pair_pool(proposal, label_info: dict[str, dict], log_likelihood: ImageLogLikelihood, judge,
              config: OptimumConfig, context: int, target_index: int,
              start: SamplePool | None = None,
              keep: Callable[[SamplePool], None] | None = None) -> SamplePool:
    """`short_pair_samples` of the proposal policy drawn for one (context, target) pair, each
    with its path's log q/p_pre, topped up while the pair's ESS is below `min_ess` (as
    `base_pool` tops up a context) to at most `max_short_pair_samples`. Its seeds depend on the
    pair and the row alone, so pairs can be drawn apart (another process) and joined, and a
    `start` pool (this pair's samples under a smaller cap, or an interrupted draw's) is
    continued, not redrawn; `keep` as in `base_pool`."""
    pool, scorers, judge = _empty_pool(proposal, label_info, judge, config)
    if start is not None:
        pool = start
    targets = list(itertools.product(*(range(n) for n in proposal.label_classes.values())))
    number = pool.contexts.index(context) * len(targets) + target_index
    cap = max(config.max_short_pair_samples, config.short_pair_samples)

    def still_short() -> int:
        drawn = len(pool.context_of_row)
        if drawn < config.short_pair_samples:
            return config.short_pair_samples - drawn
        rows = np.arange(drawn)
        return _more_samples(drawn, smallest_ess(pool, targets[target_index], rows,
                                                 config.guidance_levels), config, cap)

    while more := still_short():
        _draw(pool, proposal, scorers, log_likelihood, judge, [context] * more,
              config.seed + PAIR_SEEDS * (1 + number), config, keep,
              target=targets[target_index])
    return pool


class PoolCache:
    """Samples drawn for an estimate, kept as .npz files in `directory` (one per pool: the
    base samples, each pair's proposal samples) so that an interrupted estimate resumes where
    it stopped, a later estimate with larger caps only draws what it adds, and processes on one
    machine share the drawing: a pool another live process is drawing is waited for, not drawn
    twice. A cache belongs to one model, reward, proposal and sampler: give each its own
    directory."""

    def __init__(self, directory: str | Path, poll_seconds: float = 30.0):
        self.directory = Path(directory)
        self.poll_seconds = poll_seconds

    def get(self, name: str, draw: Callable[[SamplePool | None, Callable], SamplePool]
            ) -> SamplePool:
        """`draw(saved, keep)`: the pool saved as `name` (None if none), continued by `draw`
        where it asks for more samples, which calls `keep(pool)` to save its progress."""
        path = self.directory / f"{name}.npz"
        claim = self.directory / f".{name}.drawing"
        while _drawing_elsewhere(claim):
            time.sleep(self.poll_seconds)
        saved = SamplePool.load(path) if path.is_file() else None
        saved_rows = -1 if saved is None else len(saved.context_of_row)
        self.directory.mkdir(parents=True, exist_ok=True)
        claim.write_text(str(os.getpid()))

        def keep(pool: SamplePool) -> None:
            nonlocal saved_rows
            partial = path.with_name(f".{path.name}.partial")
            pool.save(partial)
            partial.replace(path)   # whole or absent: another process may be reading it
            saved_rows = len(pool.context_of_row)

        try:
            pool = draw(saved, keep)
            if len(pool.context_of_row) != saved_rows:   # a draw that did not keep its own
                keep(pool)
        finally:
            claim.unlink(missing_ok=True)
        return pool


def _drawing_elsewhere(claim: Path) -> bool:
    """Whether the process named in `claim` is alive and not this one."""
    try:
        pid = int(claim.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    except PermissionError:   # alive, another user's
        return True
    return pid != os.getpid()


def _cached(cache: PoolCache | None, name: str,
            draw: Callable[[SamplePool | None, Callable | None], SamplePool]) -> SamplePool:
    return draw(None, None) if cache is None else cache.get(name, draw)


def keep_the_larger_ess(pool: SamplePool, pairs: list[tuple[int, int]],
                        tilts: Sequence[float]) -> list[tuple[int, int]]:
    """For each (context, target index) pair a proposal drew for, set its rows aside where the
    base samples' smallest ESS over `tilts` is the larger (a policy that misses the pair's
    optimum); returns the pairs the proposal still serves."""
    targets, kept = list(pool.log_likelihood), []
    for c, index in pairs:
        own = np.flatnonzero((pool.context_of_row == c) & (pool.target_of_row == index))
        base = np.flatnonzero((pool.context_of_row == c) & pool.base_rows())
        if (smallest_ess(pool, targets[index], own, tilts)
                < smallest_ess(pool, targets[index], base, tilts)):
            pool.target_of_row[own] = SET_ASIDE
        else:
            kept.append((c, index))
    return kept


def _top_up(pool: SamplePool, config: OptimumConfig) -> dict[int, int]:
    """How many more samples each context needs: the rest of its first `samples_per_context`,
    then, where its lowest ESS is below `min_ess`, 20% over the proportional estimate, within
    `max_samples_per_context`."""
    drawn = {c: int((pool.context_of_row == c).sum()) for c in pool.contexts}
    if first := {c: config.samples_per_context - count for c, count in drawn.items()
                 if count < config.samples_per_context}:
        return first
    more = {}
    for c in pool.contexts:
        rows = np.flatnonzero(pool.context_of_row == c)
        cap = max(config.max_samples_per_context, config.samples_per_context)
        ess = min(weights_kl_and_ess(tilted_weights(log_likelihood[rows], tilt))[1]
                  for log_likelihood in pool.log_likelihood.values()
                  for tilt in config.guidance_levels)
        if count := _more_samples(len(rows), ess, config, cap):
            more[c] = count
    return more


def _more_samples(drawn: int, ess: float, config: OptimumConfig, cap: int) -> int:
    """How many more samples an ESS below `min_ess` asks for (20% over the proportional
    estimate: the ESS grows in proportion to the samples), within `cap`; 0 if none."""
    if ess >= config.min_ess or drawn >= cap:
        return 0
    wanted = math.ceil(1.2 * drawn * config.min_ess / ess)
    return min(cap, max(wanted, drawn + 1)) - drawn


def tilted_weights(log_likelihood: np.ndarray, tilt: float) -> np.ndarray:
    """Self-normalised weights proportional to p(y | x)^tilt (computed in log space)."""
    return normalised(tilt * log_likelihood)


def normalised(log_weights: np.ndarray) -> np.ndarray:
    """Self-normalised weights from unnormalised log weights."""
    weights = np.exp(log_weights - log_weights.max())
    return weights / weights.sum()


def tilted_kl(log_weights: np.ndarray, weights: np.ndarray, tilted: np.ndarray) -> float:
    """KL(optimum || base) from an importance sample: E_w[tilt log p] - log mean(exp(log_weights))
    (= sum_i w_i log(M w_i) for base samples, whose log weights are the tilted log p)."""
    log_mean = float(np.logaddexp.reduce(log_weights) - math.log(len(log_weights)))
    return max(float(weights @ tilted) - log_mean, 0.0)


def weights_kl_and_ess(weights: np.ndarray) -> tuple[float, float]:
    """KL(weighted || uniform) = sum_i w_i log(M w_i), and the effective sample size."""
    positive = weights[weights > 0]
    kl = float((positive * np.log(len(weights) * positive)).sum())
    return max(kl, 0.0), float(1.0 / (weights**2).sum())  # >= 0; rounding gave -0.00 at w = 1/M


def optimum_at(pool: SamplePool, label_info: dict[str, dict], tilt: float) -> dict:
    """The optimum's report at gamma / alpha = ``tilt``, in the evaluation protocol's terms."""
    names = list(pool.labels)
    y_true = {name: [] for name in names}
    y_pred = {name: [] for name in names}
    sample_weight, joint, fidelity, reward, kls, esses, fractions = [], [], [], [], [], [], []
    log_partitions = []
    for index, (target, log_likelihood) in enumerate(pool.log_likelihood.items()):
        for c in pool.contexts:
            rows = pool.rows(c, index)
            log_weights = pool.log_weights(target, rows, tilt)
            weights = normalised(log_weights)
            ess = float(1.0 / (weights**2).sum())
            kl = tilted_kl(log_weights, weights, tilt * log_likelihood[rows])
            log_partitions.append(float(np.logaddexp.reduce(log_weights) - math.log(len(rows))))
            kls.append(kl)
            esses.append(ess)
            fractions.append(ess / len(rows))
            sample_weight.append(weights)
            correct = np.ones(len(rows), dtype=bool)
            for name, k in zip(names, target, strict=True):
                y_true[name].append(np.full(len(rows), k))
                y_pred[name].append(pool.labels[name][rows])
                correct &= pool.labels[name][rows] == k
            joint.append(float(weights @ correct))
            reward.append(float(weights @ log_likelihood[rows]))
            if pool.judged_digits is not None:
                fidelity.append(float(weights @ (pool.judged_digits[rows]
                                                 == pool.context_digits[c])))
    weight = np.concatenate(sample_weight)
    report: dict = {"gamma_over_alpha": tilt, "labels": {}}
    for name in names:
        true, pred = np.concatenate(y_true[name]), np.concatenate(y_pred[name])
        classes = list(range(int(label_info[name]["num_classes"])))
        report["labels"][name] = {
            "accuracy": float(accuracy_score(true, pred, sample_weight=weight)),
            "macro_f1": float(f1_score(true, pred, labels=classes, average="macro",
                                       sample_weight=weight, zero_division=0)),
            "per_class_f1": f1_score(true, pred, labels=classes, average=None,
                                     sample_weight=weight, zero_division=0).round(4).tolist(),
            "class_names": class_names(label_info[name]),
            "scorer": pool.scorers[name],
        }
    # objective: J / kl_weight = tilt E[log p] - KL, which for the optimum is log Z
    report.update(joint_accuracy=float(np.mean(joint)), expected_reward=float(np.mean(reward)),
                  kl=float(np.mean(kls)), objective=float(np.mean(log_partitions)),
                  ess_min=float(np.min(esses)),
                  ess_mean=float(np.mean(esses)),
                  ess_per_sample_min=float(np.min(fractions)))
    if fidelity:
        report["fidelity"] = float(np.mean(fidelity))
    if len(names) == 1:
        report.update({k: report["labels"][names[0]][k] for k in ("accuracy", "macro_f1")})
    return report


def exact_optimum(model, label_info: dict[str, dict], log_likelihood: ImageLogLikelihood, judge,
                  config: OptimumConfig, grid_path: str | Path | None = None,
                  proposal=None, cache: PoolCache | None = None) -> dict:
    """The optimum at every guidance level (and the base model at level 0), with the ESS
    warning, and optionally a grid (rows = targets, columns = contexts) drawn from the optimum
    at the first level. From base samples; with a trained policy (`proposal`), from its samples
    instead, for every pair or (with `short_pair_samples`) for the pairs whose base ESS is
    still short, whose base-only estimate is then kept as ``base_samples_levels``. With a
    `cache`, the samples drawn are kept there and taken from there."""
    hybrid = proposal is not None and config.short_pair_samples > 0
    pool = (_cached(cache, "base", lambda saved, keep: base_pool(
                model, label_info, log_likelihood, judge, config, start=saved, keep=keep))
            if proposal is None or hybrid
            else proposal_pool(proposal, label_info, log_likelihood, judge, config))
    result = {"proposal": "base" if proposal is None else "policy",
              "samples_per_context": config.samples_per_context,
              "num_inference_steps": config.num_inference_steps, "min_ess": config.min_ess,
              "base": optimum_at(pool, label_info, 0.0)}
    if proposal is None or hybrid:
        result["rare_pairs"] = [
            {"context": context_labels(model, [c])[0],
             "target": target_labels({name: label_info[name] for name in pool.labels},
                                     [target])[0], "log_z": log_z}
            for c, target, log_z in rare_pairs(pool)]
    if hybrid:
        result["base_samples_levels"] = [optimum_at(pool, label_info, tilt)
                                         for tilt in config.guidance_levels]
        short = add_proposal_for_short_pairs(pool, proposal, label_info, log_likelihood, judge,
                                             config, cache)
        names = {name: label_info[name] for name in pool.labels}
        targets = list(pool.log_likelihood)
        result["short_pairs"] = [
            {"context": context_labels(model, [c])[0],
             "target": target_labels(names, [targets[index]])[0],
             "samples": len(pool.rows(c, index)),
             "ess_min": smallest_ess(pool, targets[index], pool.rows(c, index),
                                     config.guidance_levels)} for c, index in short]
        result["proposal"] = f"base, and the policy for {len(short)} pairs" if short else "base"
    levels = [optimum_at(pool, label_info, tilt) for tilt in config.guidance_levels]
    for level in levels:
        level["trustworthy"] = level["ess_min"] >= config.min_ess
    drawn = pool.base_rows() if hybrid else np.ones(len(pool.context_of_row), dtype=bool)
    result.update(samples_drawn=[int(((pool.context_of_row == c) & drawn).sum())
                                 for c in pool.contexts], contexts=pool.contexts, levels=levels)
    if grid_path is not None:
        result["grid"] = str(_optimum_grid(model, pool, label_info, config.guidance_levels[0],
                                           config.seed, grid_path))
    return result


def rare_pairs(pool: SamplePool, below: float = RARE_LOG_Z, count: int = 3
               ) -> list[tuple[int, tuple, float]]:
    """The (context, target) pairs the base makes least often, log E_pre[p(y | x0, c)] below
    `below` (at most `count`, rarest first), from base samples: a value head learns h for a
    pair from its context's base rollouts that reach the target, so a policy falls short of the
    optimum there first (docs/update_rules.md, section 20)."""
    pairs = []
    for c in pool.contexts:
        rows = np.flatnonzero((pool.context_of_row == c) & pool.base_rows())
        for target, log_likelihood in pool.log_likelihood.items():
            log_z = float(np.logaddexp.reduce(log_likelihood[rows]) - math.log(len(rows)))
            if log_z < below:
                pairs.append((c, target, log_z))
    return sorted(pairs, key=lambda pair: pair[2])[:count]


def _optimum_grid(model, pool: SamplePool, label_info: dict[str, dict], tilt: float, seed: int,
                  path: str | Path) -> Path:
    """One sample per (target, context), resampled from the optimum at ``tilt``; rows and
    columns named by target and context."""
    generator = np.random.default_rng(seed)
    picks = []
    for index, target in enumerate(pool.log_likelihood):
        for c in pool.contexts:
            rows = pool.rows(c, index)
            picks.append(rows[generator.choice(len(rows), p=normalised(
                pool.log_weights(target, rows, tilt)))])
    return save_grid(pool.images[picks], rows=len(pool.log_likelihood), path=path,
                     row_labels=target_labels({name: label_info[name] for name in pool.labels},
                                              list(pool.log_likelihood)),
                     column_labels=context_labels(model, pool.contexts),
                     title=f"the optimum at gamma/alpha {tilt:g}")


def optimum_for_run(levels: Sequence[dict], tilt: float) -> dict | None:
    """The level of an `exact_optimum` result at ``tilt`` (None if it was not estimated)."""
    return next((level for level in levels if math.isclose(level["gamma_over_alpha"], tilt)),
                None)


def format_optimum(result: dict) -> str:
    """One line per guidance level: what the reward can buy and at what KL."""
    names = list(result["base"]["labels"])
    header = "  gamma/alpha  " + "  ".join(f"{name + ' F1':>16}" for name in names)
    header += "  joint acc  fidelity  E[log p(y|x)]  KL (nats)  ESS min"
    drawn = result.get("samples_drawn") or [result["samples_per_context"]]
    counts = f"{min(drawn)}" if min(drawn) == max(drawn) else \
        f"{min(drawn)}-{max(drawn)} (more where the ESS was low)"
    by_policy = result.get("proposal") == "policy"
    source = (f"the fine-tuned policy's samples: {result['samples_per_context']} per target and "
              f"context" if by_policy else f"base samples: {counts} per context")
    if result.get("short_pairs"):
        pairs = ", ".join(f"{pair['context']} / {pair['target']}" for pair in result["short_pairs"])
        source += (f"; the fine-tuned policy's for the {len(result['short_pairs'])} pairs whose "
                   f"ESS stayed short ({pairs})")
    lines = [f"exact optimum (importance-weighted {source}, "
             f"{result['num_inference_steps']} steps)", header]
    warnings = []
    for level in (result["levels"] if by_policy else [result["base"], *result["levels"]]):
        label = "base" if level is result["base"] else f"{level['gamma_over_alpha']:g}"
        f1s = "  ".join(f"{level['labels'][name]['macro_f1']:>16.3f}" for name in names)
        fidelity = f"{level['fidelity']:.3f}" if "fidelity" in level else "   -"
        lines.append(f"  {label:>11}  {f1s}  {level['joint_accuracy']:>9.3f}  {fidelity:>8}  "
                     f"{level['expected_reward']:>13.3f}  {level['kl']:>9.2f}  "
                     f"{level['ess_min']:>7.1f}")
        if level is not result["base"] and not level["trustworthy"]:
            warnings.append(f"  warning: at gamma/alpha {label} the effective sample size falls "
                            f"to {level['ess_min']:.1f} (< {result['min_ess']:g}): the estimate "
                            f"is not trustworthy; raise samples_per_context (or "
                            f"max_samples_per_context)")
    if result.get("rare_pairs"):
        pairs = "; ".join(f"{pair['context']} / {pair['target']}: 1 in "
                          f"{math.exp(-pair['log_z']):,.0f}" for pair in result["rare_pairs"])
        warnings.append(f"  rare (context, target) pairs under the base: {pairs}. The value "
                        f"rule learns h for a pair from its context's base rollouts that reach "
                        f"the target: expect the policy to fall short of the optimum there "
                        f"first; more base rollouts (objective.batch_size) close it slowly "
                        f"(docs/update_rules.md, sections 17 and 20)")
    return "\n".join(lines + warnings)


def against_optimum(policy: dict, optimum: dict, base: dict) -> dict[str, float]:
    """The policy's report next to the optimum's level at the same gamma/alpha, per label:
    score ratio (macro-F1), KL ratio, and control per nat, (macro-F1 - base's) / KL, for both.
    ``base`` is the base model's report (or the optimum's own base level). Where the policy's
    report has E[log p] (`evaluate` with the reward), also its distance to the optimum,
    KL(pi || pi*) = J* / kl_weight - J / kl_weight, in nats: how far the policy is from the
    exact optimum whatever the score says."""
    comparison = {"kl_ratio": policy["mean_kl"] / optimum["kl"] if optimum["kl"] else math.nan}
    if "expected_reward" in policy and "objective" in optimum:
        objective = optimum["gamma_over_alpha"] * policy["expected_reward"] - policy["mean_kl"]
        comparison["kl_to_optimum"] = optimum["objective"] - objective
    for name, scores in policy["labels"].items():
        score, best = scores["macro_f1"], optimum["labels"][name]["macro_f1"]
        floor = base["labels"][name]["macro_f1"]
        comparison[f"{name}_score_ratio"] = score / best if best else math.nan
        comparison[f"{name}_per_nat"] = (score - floor) / policy["mean_kl"] \
            if policy["mean_kl"] else math.nan
        comparison[f"{name}_optimum_per_nat"] = (best - floor) / optimum["kl"] \
            if optimum["kl"] else math.nan
    return comparison


def format_against_optimum(comparison: dict[str, float], labels: Sequence[str]) -> str:
    """One line per label: the score ratio, the KL ratio and control per nat against the optimum."""
    lines = ["CTRL against the exact optimum (same gamma/alpha)"]
    if "kl_to_optimum" in comparison:
        lines.append(f"  distance to the optimum, KL(pi || pi*): "
                     f"{comparison['kl_to_optimum']:.3f} nats")
    for name in labels:
        lines.append(f"  {name:<16} score {comparison[f'{name}_score_ratio']:.2f}x  KL "
                     f"{comparison['kl_ratio']:.2f}x  control per nat "
                     f"{comparison[f'{name}_per_nat']:.3f} (optimum "
                     f"{comparison[f'{name}_optimum_per_nat']:.3f})")
    return "\n".join(lines)
