"""How much KL the exact optimum spends by the end of the first reverse step, by nested rollouts,
next to what a value policy spends in its first step (the text testbed's ink, gamma/alpha 1).

The optimum's marginal of x after step k is p_pre(x) h_k(x) / Z with h_k(x) = E_pre[p(y | x0)^lambda
| x_k = x], so its KL to the base up to there (the initial tilt included, which a policy that
starts from N(0, I) must also make in its first step) is E*[log h_k / Z]. Estimated per
(prompt, y): N base states after the first step, R base continuations from each to score
h_k(x_i) = mean_r p(y | x0_ir)^lambda, then self-normalised weights h_k(x_i) / sum. Prints a table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_probes/first_step_kl.py POLICY_DIR
"""

from __future__ import annotations

import sys

import torch

from ctrl_ray.config import load_config
from ctrl_ray.evaluation import context_indices
from ctrl_ray.finetune import FinetuneConfig, build_setup
from ctrl_ray.policy import load_any
from ctrl_ray.sampling.sampler import DenoisingSchedule, RolloutInputs, sample, step_mean

PROMPTS = ["a handwritten zero", "the digit one", "three written by hand", "seven written by hand"]
STATES, CONTINUATIONS, STEPS = 96, 16, 20


def main() -> None:
    torch.set_num_threads(1)
    setup = build_setup(load_config(FinetuneConfig, "configs/ctrl_text2image_ink.yaml", []))
    model = setup.model.eval()
    schedule = DenoisingSchedule.create(model.alphas_cumprod, STEPS, 1.0)
    policy = load_any(sys.argv[1]).model.eval()
    generator = torch.Generator().manual_seed(0)
    print("| prompt | y | optimum KL after step 1 (nats) | policy KL in step 1 |")
    print("|---|---|---|---|")
    for prompt in PROMPTS:
        c = context_indices(model, [prompt])
        x = torch.randn((STATES, *model.sample_shape), generator=generator)
        contexts = c.repeat(STATES)
        with torch.no_grad():
            x = step_mean(schedule, 0, model.reference_noise, x, contexts, model.clip_sample) + \
                schedule.sigmas[0] * torch.randn(x.shape, generator=generator)
            x = x.repeat_interleave(CONTINUATIONS, 0)
            contexts = c.repeat(len(x))
            for step in range(1, STEPS):
                mean = step_mean(schedule, step, model.reference_noise, x, contexts,
                                 model.clip_sample)
                x = mean + schedule.sigmas[step] * torch.randn(x.shape, generator=generator)
            images = model.decode(x)
        for y in range(4):
            labels = {"ink_class": torch.full((len(x),), y)}
            with torch.no_grad():
                log_p = setup.image_log_likelihood(images, labels, contexts).double()
            log_h = torch.logsumexp(log_p.view(STATES, CONTINUATIONS), 1) - \
                torch.log(torch.tensor(float(CONTINUATIONS)))
            log_z = torch.logsumexp(log_h, 0) - torch.log(torch.tensor(float(STATES)))
            weights = torch.softmax(log_h, 0)
            optimum_kl = float((weights * (log_h - log_z)).sum())
            inputs = RolloutInputs.draw(1, 64, STEPS, policy.sample_shape, policy.label_classes,
                                        num_contexts=None)
            inputs.contexts = context_indices(policy, [prompt]).repeat(64)
            inputs.labels = {"ink_class": torch.full((64,), y)}
            with torch.no_grad():
                policy_kl = float(sample(policy, inputs, eta=1.0).kl[0].mean())
            print(f"| {prompt} | {y} | {optimum_kl:.3f} | {policy_kl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
