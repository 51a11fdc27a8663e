"""Benchmark the MiniLM text-conditioned digits model: does "a handwritten seven" give sevens?

Pre-trains `configs/pretrain_digits_text.yaml` (or loads `--model`), then samples every prompt
"a handwritten zero" .. "a handwritten nine" at several classifier-free guidance scales and
scores fidelity with the digit judge (prompt i asks for digit i). Also samples a few
paraphrases the model never saw, to show how far MiniLM's embedding carries. Writes
benchmarks/results/text_digits.{json,md} and a grid per guidance scale under `--out`.

    .venv/bin/python benchmarks/text_digits.py [--set training.steps=2000 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results  # noqa: E402

from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.data.digits import digit_prompts, ensure_digits  # noqa: E402
from ctrl_ray.demo import JudgeConfig, ensure_judge  # noqa: E402
from ctrl_ray.evaluation import generate, save_grid  # noqa: E402
from ctrl_ray.models.augmented import AugmentedModel  # noqa: E402
from ctrl_ray.models.loading import build_backbone  # noqa: E402
from ctrl_ray.models.text_to_image import TextToImageOptions  # noqa: E402
from ctrl_ray.pretrain import PretrainConfig, pretrain  # noqa: E402
from ctrl_ray.registry import load_base_model  # noqa: E402

PARAPHRASES = {"the digit seven": 7, "a hand-drawn number 3": 3, "zero": 0, "a written one": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain_digits_text.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model", help="an already pre-trained text model (skip training)")
    parser.add_argument("--judge", default="outputs/bench-base/judge")
    parser.add_argument("--samples-per-prompt", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps when sampling")
    parser.add_argument("--out", default="outputs/bench-text-digits")
    args = parser.parse_args()

    config = load_config(PretrainConfig, args.config,
                         [f"output_dir={args.out}/base", "registered_model=", *args.overrides])
    dataset = ensure_digits(config.data.path, size=config.data.size, seed=config.data.seed)
    judge, judge_accuracy = ensure_judge(dataset, JudgeConfig(path=args.judge))
    train = None
    if args.model is None:
        result = pretrain(config)
        args.model = str(result.model_dir)
        train = {"seconds": result.seconds, "steps_per_second": result.steps_per_second,
                 "final_loss": result.final_loss}
    base = load_base_model(args.model)

    prompts = digit_prompts(config.text.prompt_template) + list(PARAPHRASES)
    wanted = list(range(10)) + list(PARAPHRASES.values())
    rows = []
    for scale in args.guidance:
        backbone = build_backbone(base, TextToImageOptions(prompts=prompts, guidance_scale=scale))
        model = AugmentedModel(backbone, {}, adapter="none").eval()
        count = args.samples_per_prompt
        contexts = torch.arange(len(prompts)).repeat_interleave(count)
        images, _ = generate(model, contexts, {}, list(range(len(contexts))),
                             num_inference_steps=args.steps, from_reference=True)
        predicted = judge.predict(images.numpy())
        for index, prompt in enumerate(prompts):
            chosen = predicted[index * count:(index + 1) * count]
            rows.append({"guidance_scale": scale, "prompt": prompt, "digit": wanted[index],
                         "seen_in_training": index < 10,
                         "fidelity": float((chosen == wanted[index]).mean())})
        cols = min(4, count)  # the first samples of every prompt, one row per prompt
        shown = (torch.arange(len(prompts)) * count).repeat_interleave(cols) + \
            torch.arange(cols).repeat(len(prompts))
        save_grid(images[shown], rows=len(prompts), path=Path(args.out) / f"grid_w{scale:g}.png")
        print(scale, [round(r["fidelity"], 2) for r in rows[-len(prompts):]])

    summary = {}
    for scale in args.guidance:
        seen = [r["fidelity"] for r in rows if r["guidance_scale"] == scale
                and r["seen_in_training"]]
        unseen = [r["fidelity"] for r in rows if r["guidance_scale"] == scale
                  and not r["seen_in_training"]]
        summary[str(scale)] = {"fidelity_training_prompts": sum(seen) / len(seen),
                               "fidelity_paraphrases": sum(unseen) / len(unseen)}
    data = {"config": to_dict(config), "machine": machine(), "model": args.model,
            "judge_test_accuracy": judge_accuracy, "train": train,
            "samples_per_prompt": args.samples_per_prompt, "num_inference_steps": args.steps,
            "summary": summary, "rows": rows,
            "trained_steps": base.metadata.get("training", {}).get("steps"),
            "num_parameters": sum(p.numel() for p in base.unet.parameters())}
    write_results("text_digits", data, markdown(data))


def markdown(data: dict) -> str:
    config, train = data["config"], data["train"]
    lines = ["# MiniLM text-conditioned digits model", "",
             f"`python benchmarks/text_digits.py` on {data['machine']['date']}: a "
             f"{data['num_parameters'] / 1e6:.2f} M-parameter `UNet2DConditionModel` at "
             f"{config['model']['image_size']}x{config['model']['image_size']}, cross-attending "
             "to MiniLM-L6 token states (384-d), "
             f"{data['trained_steps']} training steps (batch "
             f"{config['training']['batch_size']}, prompt dropout "
             f"{config['text']['prompt_dropout']})"
             + (f", {train['seconds']:.0f} s on this CPU" if train else "") + ". "
             f"{data['samples_per_prompt']} samples per prompt, {data['num_inference_steps']} "
             "DDIM steps; fidelity = the digit judge's accuracy against the digit the prompt "
             f"names (judge test accuracy {data['judge_test_accuracy']:.3f}).", "",
             "| guidance | fidelity, the 10 training prompts | fidelity, paraphrases |",
             "|---|---|---|"]
    for scale, values in data["summary"].items():
        lines.append(f"| {float(scale):g} | {values['fidelity_training_prompts']:.3f} | "
                     f"{values['fidelity_paraphrases']:.3f} |")
    lines += ["", "Grid at guidance 3 (rows: the prompts in the order of the table below, 4 "
              "samples each): [docs/text_digits_grid.png](../../docs/text_digits_grid.png).",
              "", "Per prompt:", "", "| guidance | prompt | digit | fidelity |",
              "|---|---|---|---|"]
    for row in data["rows"]:
        seen = "" if row["seen_in_training"] else " (paraphrase)"
        lines.append(f"| {row['guidance_scale']:g} | {row['prompt']}{seen} | {row['digit']} | "
                     f"{row['fidelity']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
