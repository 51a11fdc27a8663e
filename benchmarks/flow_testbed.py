"""Benchmark the flow-matching testbed: pre-training time and whether prompts (trained templates and
held-out paraphrases) give the digit they name, as benchmarks/text2image_testbed.py measures the
latent UNet testbed.

Builds `configs/pretrain_flow.yaml` (or reads `--model`, whose `ctrl_ray.json` holds the training
time), then for every training prompt and every held-out paraphrase prompt, `--samples-per-prompt`
samples at each guidance scale by the flow ODE (the scheduler's Euler steps, as diffusers'
`StableDiffusion3Pipeline` samples), decoded by the reused VAE and resized to the digit judge's
size (`reward_view`); fidelity = the judge's accuracy against the digit the prompt names. Writes
benchmarks/results/flow_testbed.{json,md} and a grid in docs/.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_testbed.py [--model DIR]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import TESTBED, machine, publish, testbed_parser  # noqa: E402
from text2image_testbed import (  # noqa: E402
    grid_images,
    per_template,
    prompt_table,
    summarise,
    template_lines,
)

from ctrl_ray.config import load_config, to_dict  # noqa: E402
from ctrl_ray.data.digits import ensure_digits  # noqa: E402
from ctrl_ray.demo import JudgeConfig, ensure_judge  # noqa: E402
from ctrl_ray.evaluation import save_grid  # noqa: E402
from ctrl_ray.flow_testbed import build_flow_testbed, sample_latents  # noqa: E402
from ctrl_ray.flow_testbed_config import FlowTestbedConfig  # noqa: E402
from ctrl_ray.models.text_encoder import load_pretrained_encoder  # noqa: E402
from ctrl_ray.models.text_to_image import reward_view  # noqa: E402

GRID = Path("docs/flow_testbed_grid.png")
CHUNK = 256  # samples per ODE batch


def main() -> None:
    parser = testbed_parser(__doc__, "judge", "dataset")
    parser.add_argument("--config", default="configs/pretrain_flow.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--model", help="an already built flow testbed (skip training)")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--steps", type=int, default=30, help="Euler steps of the flow ODE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="flow_testbed", help="results file name")
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = load_config(FlowTestbedConfig, args.config, args.overrides)
    judge_data = ensure_digits(args.dataset or TESTBED["dataset"], size=16)
    judge, judge_accuracy = ensure_judge(judge_data, JudgeConfig(path=args.judge))
    if args.model is None:
        args.model = str(build_flow_testbed(config).model_dir)
    model = load_flow_testbed(Path(args.model))
    metadata = model["metadata"]

    table = prompt_table(metadata)
    prompts = [entry["prompt"] for entry in table]
    wanted = torch.tensor([entry["digit"] for entry in table])
    count = args.samples_per_prompt
    rows, grid_rows, seconds = [], {}, {}
    for scale in args.guidance:
        start = time.perf_counter()
        images = sample_prompts(model, prompts, count, scale, args.steps, args.seed)
        seconds[str(scale)] = round(time.perf_counter() - start, 1)
        predicted = torch.from_numpy(
            judge.predict(reward_view(images, 1, judge.image_size).numpy()))
        contexts = torch.arange(len(prompts)).repeat_interleave(count)
        hits = (predicted == wanted[contexts]).float().view(len(prompts), count).mean(1)
        rows += [{**entry, "guidance_scale": scale, "fidelity": float(hit)}
                 for entry, hit in zip(table, hits, strict=True)]
        grid_rows[scale] = grid_images(images, table, count)
        summary = summarise(rows, scale)
        print(f"guidance {scale:g}: training {summary['training']:.3f}, "
              f"held-out {summary['heldout']:.3f} ({seconds[str(scale)]:.0f} s)", flush=True)
    shown = max(args.guidance)
    GRID.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid_rows[shown], rows=10, path=GRID)

    data = {
        "config": to_dict(config), "machine": machine(), "model": args.model,
        "training": metadata.get("training", {}),
        "num_parameters": {"transformer": sum(p.numel() for p in
                                              model["transformer"].parameters()),
                           "vae": sum(p.numel() for p in model["vae"].parameters())},
        "judge": {"path": args.judge, "test_accuracy_16": judge_accuracy},
        "samples_per_prompt": count, "num_inference_steps": args.steps, "seed": args.seed,
        "sampling_seconds": seconds,
        "summary": {str(scale): summarise(rows, scale) for scale in args.guidance},
        "per_template": per_template(rows),
        "grid": str(GRID), "grid_guidance": shown, "rows": rows,
    }
    publish(args.name, data, markdown(data, metadata))


def load_flow_testbed(path: Path) -> dict:
    """The folder's parts, read with diffusers and ctrl-ray's prompt encoder (offline)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    metadata = json.loads((path / "ctrl_ray.json").read_text())
    return {
        "metadata": metadata,
        "transformer": SD3Transformer2DModel.from_pretrained(path / "transformer").eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
        "vae": AutoencoderKL.from_pretrained(path / "vae").eval(),
        "encoder": load_pretrained_encoder(path / "text_encoder", path / "tokenizer",
                                           int(metadata["max_length"])),
    }


@torch.no_grad()
def sample_prompts(model: dict, prompts: list[str], count: int, scale: float, steps: int,
                   seed: int) -> torch.Tensor:
    """`count` decoded images per prompt (prompt-major), in [-1, 1]: the flow ODE from seeded
    noise, then the VAE decoder on the unscaled latents."""
    states, pooled = model["encoder"].encode_with_embedding(prompts)
    empty = model["encoder"].encode_with_embedding([""])
    rows = torch.arange(len(prompts)).repeat_interleave(count)
    shape = model["metadata"]["latent_shape"]
    noise = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(seed))
    vae = model["vae"]
    images = []
    for chunk in torch.arange(len(rows)).split(CHUNK):
        latents = sample_latents(model["transformer"], model["scheduler"],
                                 (states[rows[chunk]], pooled[rows[chunk]]), empty, scale,
                                 steps, noise[chunk])
        images.append(vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1))
    return torch.cat(images)


def markdown(data: dict, metadata: dict) -> list[str]:
    config, training = data["config"], data["training"]["transformer"]
    params = data["num_parameters"]
    cfg = config["transformer"]
    lines = [
        "# Flow-matching testbed (SD3 layout, MiniLM prompts)", "",
        f"`OMP_NUM_THREADS=1 python benchmarks/flow_testbed.py --model {data['model']}` on "
        f"{data['machine']['date']} (one torch thread, a 2-core CPU shared with other work; "
        f"1-minute load average {data['machine']['load_average_1min']:.1f} at the end). "
        f"Model: `{data['model']}`, built by `ctrl-ray flow build --config "
        f"configs/pretrain_flow.yaml`: an `SD3Transformer2DModel` "
        f"({params['transformer'] / 1e6:.2f} M parameters; patch {cfg['patch_size']}, "
        f"{cfg['num_layers']} joint blocks, width "
        f"{cfg['num_attention_heads'] * cfg['attention_head_dim']}) trained by flow matching "
        f"on the {'x'.join(map(str, metadata['latent_shape']))} latents of the latent "
        f"testbed `{metadata['latent_testbed']}`, whose VAE ({params['vae'] / 1e6:.2f} M) and "
        f"MiniLM text encoder it reuses unchanged; {len(metadata['training_prompts'])} "
        f"training prompts ({len(metadata['training_templates'])} templates x digit names "
        f"and numerals, prompt dropout {config['text']['prompt_dropout']}), times drawn "
        f"{cfg['timestep_sampling']}, scheduler shift {config['scheduler']['shift']:g}.", "",
        "## Pre-training", "",
        "| stage | steps (batch) | seconds | torch threads | final loss |",
        "|---|---|---|---|---|",
        f"| transformer | {training['steps']} ({cfg['batch_size']}) | "
        f"{training['seconds']:.0f} ({training['seconds'] / 60:.1f} min) | "
        f"{training.get('torch_threads', '?')} | {training['final_loss']:.4f} |", "",
        "The VAE and text encoder are the latent testbed's (see text2image_testbed.md for "
        "their training and reconstruction).", "",
        "## Prompt fidelity", "",
        f"{data['samples_per_prompt']} samples per prompt, {data['num_inference_steps']} Euler "
        "steps of the flow ODE (the scheduler's default sigma grid, as "
        "`StableDiffusion3Pipeline` samples), decoded and resized to the 16x16 digit judge "
        "(`reward_view`); fidelity = the judge's accuracy against the digit the prompt names "
        f"(judge: {data['judge']['test_accuracy_16']:.3f} on the real 16x16 test digits). "
        "Held-out paraphrases are templates no training prompt used.", "",
        "| guidance | training prompts | held-out paraphrases | the 10 default prompts | "
        "sampling seconds |", "|---|---|---|---|---|",
    ]
    for scale, values in data["summary"].items():
        lines.append(f"| {float(scale):g} | {values['training']:.3f} | {values['heldout']:.3f} "
                     f"| {values['default_prompts']:.3f} | {data['sampling_seconds'][scale]:.0f} |")
    return lines + template_lines(data, metadata)


if __name__ == "__main__":
    main()
