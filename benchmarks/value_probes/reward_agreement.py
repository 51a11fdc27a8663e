"""Does a policy's reward gain reach the label, or only the reward model? On the same rollouts
of the training distribution (labels, contexts and noise from one seed) for the base and each
policy: the reward model's E[log p(y | x0)] and mean p(y | x0) (the hit rate it believes in),
the label's scorer's hit rate (the oracle, judge or labeller the evaluation uses), and how often
the reward model's argmax agrees with the scorer. A policy that climbs the reward model's
likelihood while the scorer's hit rate stays put has found the reward model's own directions
(docs/update_rules.md, section 25).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/reward_agreement.py CONFIG \
        POLICY_DIR [POLICY_DIR ...] [--set key=value ...] [--rollouts 256] [--seed 1]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ctrl_ray.config import load_config
from ctrl_ray.finetune_setup import FinetuneConfig, build_setup
from ctrl_ray.models.text_to_image import decode_images
from ctrl_ray.objectives.base import draw_inputs
from ctrl_ray.policy import load_any
from ctrl_ray.sampling.sampler import sample
from ctrl_ray.scoring import get_scorer

sys.path.insert(0, str(Path(__file__).parent))
from policy_objective import paired_parser  # noqa: E402


def agreement(model, setup, config, inputs, from_reference: bool = False) -> dict:
    """The reward model's belief against the scorer's verdict on `model`'s rollouts (one label)."""
    term = setup.reward.terms[0]
    name = term.label_name
    scorer = get_scorer(name, setup.label_info[name])
    log_probs, scored, kl = [], [], []
    for start in range(0, inputs.batch_size, config.batch_size):
        with torch.no_grad():
            rollout = sample(model, inputs.slice(start, start + config.batch_size),
                             eta=config.eta, kl_reduction=config.kl_reduction,
                             from_reference=from_reference)
            images = decode_images(model.backbone, rollout.x0)
            contexts = rollout.contexts if term.uses_context else None
            log_probs.append(term.log_probs(term.view(images), contexts).float())
        scored.append(torch.as_tensor(np.asarray(scorer.label(images)), dtype=torch.long))
        if not from_reference:
            kl.append(rollout.path_kl.float())
    log_probs, scored = torch.cat(log_probs), torch.cat(scored)
    targets = inputs.labels[name].long()
    believed = log_probs.gather(1, targets[:, None]).squeeze(1)
    hits = (scored == targets).float()
    return {"log_likelihood": believed.mean().item(), "believed": believed.exp().mean().item(),
            "hit_rate": hits.mean().item(),
            "hit_rate_se": hits.std().item() / math.sqrt(len(hits)),
            "agreement": (log_probs.argmax(1) == scored).float().mean().item(),
            "kl": torch.cat(kl).mean().item() if kl else 0.0}


def main() -> None:
    parser = paired_parser(__doc__)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(FinetuneConfig, args.config, args.overrides)
    setup = build_setup(config)
    if len(setup.reward.terms) != 1:
        parser.error("one reward term only: the scorer's verdict is per label")
    inputs = draw_inputs(setup.model, dataclasses.replace(
        config.objective, batch_size=args.rollouts), args.seed)
    policies = {path: load_any(path).model.eval() for path in args.policies}   # before rollouts
    rows = {"base": agreement(setup.model.eval(), setup, config.objective, inputs, True)}
    for path, model in policies.items():
        rows[path] = agreement(model, setup, config.objective, inputs)
    print("| policy | KL | E[log p] (reward) | mean p(y | x0) (reward) | hit rate (scorer) | "
          "reward argmax = scorer |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['kl']:.2f} | {row['log_likelihood']:.3f} | {row['believed']:.3f} "
              f"| {row['hit_rate']:.3f} +- {row['hit_rate_se']:.3f} | {row['agreement']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
