"""Benchmark the latent text-to-image testbed: pre-training time, VAE reconstruction, and whether
prompts (trained templates and held-out paraphrases) give the digit they name.

Builds `configs/pretrain_text2image.yaml` (or reads `--model`, whose `ctrl_ray.json` holds the
training times), then: the VAE's reconstruction MSE and PSNR on the held-out test digits; for
every training prompt and every held-out paraphrase prompt (each template with each digit's
name and numeral), `--samples-per-prompt` samples at each guidance scale, decoded and resized to
the digit judge's size (`reward_view`), fidelity = the judge's accuracy against the digit the
prompt names. Writes benchmarks/results/text2image_testbed.{json,md} and a grid in docs/.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text2image_testbed.py [--model DIR]
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TESTBED, machine, publish, testbed_parser  # noqa: E402

from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.data.digits import (  # noqa: E402
    NUM_DIGITS,
    ensure_digits,
    require_digits,
    template_prompts,
)
from ctrl_ray.demo import JudgeConfig, ensure_judge  # noqa: E402
from ctrl_ray.evaluation import generate, save_grid  # noqa: E402
from ctrl_ray.latent_testbed import (  # noqa: E402
    LatentTestbedConfig,
    build_latent_testbed,
    psnr,
    reconstruction_mse,
)
from ctrl_ray.models.augmented import AugmentedModel  # noqa: E402
from ctrl_ray.models.loading import build_backbone, load_base_model_dir  # noqa: E402
from ctrl_ray.models.text_to_image import TextToImageOptions, reward_view  # noqa: E402

GRID = Path("docs/text2image_testbed_grid.png")


def main() -> None:
    parser = testbed_parser(__doc__, "judge", "dataset")
    parser.add_argument("--config", default="configs/pretrain_text2image.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model", help="an already built testbed (skip training)")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps when sampling")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(LatentTestbedConfig, args.config, args.overrides)
    judge_data = ensure_digits(args.dataset or TESTBED["dataset"], size=16)
    judge, judge_accuracy = ensure_judge(judge_data, JudgeConfig(path=args.judge))
    if args.model is None:
        args.model = str(build_latent_testbed(config).model_dir)
    base = load_base_model_dir(Path(args.model))
    metadata = base.metadata

    test = require_digits(metadata["dataset"], size=base.image_shape[-1]).subset("test")
    test_images = torch.from_numpy(test.images)
    with torch.no_grad():
        recon_mse = reconstruction_mse(base.vae, test_images)
    judge_on_real = float((judge.predict(reward_view(test_images, 1, judge.image_size).numpy())
                           == test.digits).mean())

    table = prompt_table(metadata)
    prompts = [entry["prompt"] for entry in table]
    wanted = torch.tensor([entry["digit"] for entry in table])
    count = args.samples_per_prompt
    rows, grid_rows = [], {}
    for scale in args.guidance:
        backbone = build_backbone(base, TextToImageOptions(prompts=prompts, guidance_scale=scale))
        model = AugmentedModel(backbone, {}, adapter="none").eval()
        contexts = torch.arange(len(prompts)).repeat_interleave(count)
        images, _ = generate(model, contexts, {}, list(range(len(contexts))),
                             num_inference_steps=args.steps, from_reference=True)
        predicted = torch.from_numpy(
            judge.predict(reward_view(images, 1, judge.image_size).numpy()))
        hits = (predicted == wanted[contexts]).float().view(len(prompts), count).mean(1)
        rows += [{**entry, "guidance_scale": scale, "fidelity": float(hit)}
                 for entry, hit in zip(table, hits, strict=True)]
        grid_rows[scale] = grid_images(images, table, count)
        summary = summarise(rows, scale)
        print(f"guidance {scale:g}: training {summary['training']:.3f}, "
              f"held-out {summary['heldout']:.3f}", flush=True)
    shown = max(args.guidance)
    GRID.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid_rows[shown], rows=10, path=GRID)

    training = metadata.get("training", {})
    data = {
        "config": to_dict(config), "machine": machine(), "model": args.model,
        "pretrain_seconds": {"vae": training["vae"]["seconds"],
                             "unet": training["unet"]["seconds"],
                             "total": training["vae"]["seconds"] + training["unet"]["seconds"]},
        "training": training,
        "num_parameters": {"vae": sum(p.numel() for p in base.vae.parameters()),
                           "unet": sum(p.numel() for p in base.unet.parameters())},
        "vae_test": {"mse": recon_mse, "psnr_db": psnr(recon_mse), "images": len(test_images)},
        "judge": {"path": args.judge, "test_accuracy_16": judge_accuracy,
                  "accuracy_on_real_32_resized": judge_on_real},
        "samples_per_prompt": count, "num_inference_steps": args.steps,
        "summary": {str(scale): summarise(rows, scale) for scale in args.guidance},
        "per_template": per_template(rows),
        "grid": str(GRID), "grid_guidance": shown, "rows": rows,
    }
    publish("text2image_testbed", data, markdown(data, metadata))


def prompt_table(metadata: dict) -> list[dict]:
    """Every training and held-out prompt with its digit, set, template and word form, in the
    order of `template_prompts` (template, then names / numerals, then digit)."""
    forms = ["name", "numeral"] if metadata.get("numerals", True) else ["name"]
    table = []
    for name in ("training", "heldout"):
        for template in metadata[f"{name}_templates"]:
            prompts, digits = template_prompts([template], metadata.get("numerals", True))
            table += [{"prompt": prompt, "digit": digit, "set": name, "template": template,
                       "form": forms[index // NUM_DIGITS]}
                      for index, (prompt, digit) in enumerate(zip(prompts, digits, strict=True))]
    if [e["prompt"] for e in table if e["set"] == "training"] != metadata["training_prompts"]:
        raise SystemExit("the model's training prompts do not follow its templates")
    return table


def grid_images(images: torch.Tensor, table: list[dict], count: int) -> torch.Tensor:
    """Ten rows (digits 0..9): 4 samples of the first training prompt naming the digit, then 4
    of the first held-out paraphrase naming it."""
    columns = min(4, count)
    first = {}
    for index, entry in enumerate(table):
        first.setdefault((entry["set"], entry["digit"]), index)
    picks = [first[name, digit] * count + k for digit in range(NUM_DIGITS)
             for name in ("training", "heldout") for k in range(columns)]
    return images[picks]


def summarise(rows: list[dict], scale: float) -> dict[str, float]:
    """Mean fidelity over the training prompts, the held-out paraphrases, and the ten default
    prompts (the first template with digit names)."""
    at_scale = [r for r in rows if r["guidance_scale"] == scale]
    out = {}
    for name in ("training", "heldout"):
        values = [r["fidelity"] for r in at_scale if r["set"] == name]
        out[name] = sum(values) / len(values)
    default = [r["fidelity"] for r in at_scale if r["set"] == "training"][:NUM_DIGITS]
    out["default_prompts"] = sum(default) / len(default)
    return out


def per_template(rows: list[dict]) -> list[dict]:
    """Fidelity per (guidance, template, word form): which phrasings carry the digit."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        groups[row["guidance_scale"], row["template"], row["set"], row["form"]].append(
            row["fidelity"])
    return [{"guidance_scale": k[0], "template": k[1], "set": k[2], "form": k[3],
             "fidelity": sum(v) / len(v)} for k, v in groups.items()]


def markdown(data: dict, metadata: dict) -> list[str]:
    config, seconds = data["config"], data["pretrain_seconds"]
    params = data["num_parameters"]
    lines = [
        "# Latent text-to-image testbed (SD layout, MiniLM prompts)", "",
        f"`OMP_NUM_THREADS=1 python benchmarks/text2image_testbed.py` on "
        f"{data['machine']['date']} (one torch thread, a 2-core CPU shared with other work; "
        f"1-minute load average {data['machine']['load_average_1min']:.1f} at the end). "
        f"Model: `{data['model']}`, built by `ctrl-ray text2image build --config "
        f"configs/pretrain_text2image.yaml`: an `AutoencoderKL` ({params['vae'] / 1e6:.2f} M "
        f"parameters, {config['data']['size']}x{config['data']['size']} grey digits to "
        f"{config['vae']['latent_channels']}x{config['data']['size'] // 4}x"
        f"{config['data']['size'] // 4} latents, scaling factor "
        f"{data['training']['vae']['scaling_factor']:.3f}) and a `UNet2DConditionModel` "
        f"({params['unet'] / 1e6:.2f} M) cross-attending to MiniLM-L6 token states, trained on "
        f"{len(metadata['training_prompts'])} prompts ({len(metadata['training_templates'])} "
        f"templates x digit names and numerals, prompt dropout "
        f"{config['text']['prompt_dropout']}).", "",
        "## Pre-training and reconstruction", "",
        "| stage | steps (batch) | seconds |", "|---|---|---|",
        f"| VAE | {config['vae']['steps']} ({config['vae']['batch_size']}) | "
        f"{seconds['vae']:.0f} |",
        f"| UNet | {config['unet']['steps']} ({config['unet']['batch_size']}) | "
        f"{seconds['unet']:.0f} |",
        f"| total | | {seconds['total']:.0f} ({seconds['total'] / 60:.1f} min) |", "",
        f"VAE reconstruction on the {data['vae_test']['images']} held-out test digits "
        f"(posterior mode, clamped to [-1, 1]): MSE {data['vae_test']['mse']:.5f}, PSNR "
        f"{data['vae_test']['psnr_db']:.1f} dB (peak-to-peak 2).", "",
        "## Prompt fidelity", "",
        f"{data['samples_per_prompt']} samples per prompt, {data['num_inference_steps']} DDIM "
        "steps (eta 1), decoded and resized to the 16x16 digit judge (`reward_view`); fidelity "
        "= the judge's accuracy against the digit the prompt names. The judge: "
        f"{data['judge']['test_accuracy_16']:.3f} on the real 16x16 test digits, "
        f"{data['judge']['accuracy_on_real_32_resized']:.3f} on the real 32x32 ones resized "
        "the same way (the ceiling here). Held-out paraphrases are templates no training "
        "prompt used.", "",
        "| guidance | training prompts | held-out paraphrases | the 10 default prompts |",
        "|---|---|---|---|",
    ]
    for scale, values in data["summary"].items():
        lines.append(f"| {float(scale):g} | {values['training']:.3f} | {values['heldout']:.3f} "
                     f"| {values['default_prompts']:.3f} |")
    return lines + template_lines(data, metadata)


def template_lines(data: dict, metadata: dict) -> list[str]:
    """The per-template fidelity table and the grid's caption (Markdown lines)."""
    lines = ["", "Per template (`{}` = the digit's name or numeral):", "",
             "| guidance | template | set | form | fidelity |", "|---|---|---|---|---|"]
    for row in data["per_template"]:
        lines.append(f"| {row['guidance_scale']:g} | {row['template']} | {row['set']} | "
                     f"{row['form']} | {row['fidelity']:.3f} |")
    return lines + ["", f"Samples at guidance {data['grid_guidance']:g} "
                    f"([{data['grid']}](../../{data['grid']})): row d = digit d; four samples "
                    f"of \"{metadata['training_templates'][0].format('<name>')}\", then four "
                    f"of the held-out \"{metadata['heldout_templates'][0].format('<name>')}\"."]


if __name__ == "__main__":
    main()
