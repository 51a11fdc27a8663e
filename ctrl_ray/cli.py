"""The `ctrl-ray` command line: thin argument parsing over the Python API.

Bad input (an `InputError`) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ctrl_ray.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        args.handler(args)
    except InputError as err:
        print(f"ctrl-ray: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctrl-ray: interrupted", file=sys.stderr)
        return 130
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line with exit code 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctrl-ray",
        description="Add new conditional controls to pre-trained diffusion models with RL (CTRL).",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = _command(commands, "demo", "the end-to-end demo on the embedded default", _demo)
    _config_options(demo, required=False)

    data = commands.add_parser("data", help="build the digits testbed and offline pair sets")
    data_commands = data.add_subparsers(title="data commands", metavar="COMMAND")
    build = _command(data_commands, "build-digits", "write the digits testbed as Parquet",
                     _data_build_digits)
    build.add_argument("--size", type=int, default=16, choices=(8, 16, 32))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--out", required=True, help="output Parquet file")
    _overwrite_option(build)
    pairs = _command(data_commands, "pairs", "draw N labelled (image, y) train pairs",
                     _data_pairs)
    pairs.add_argument("--dataset", required=True, help="digits Parquet file")
    pairs.add_argument("--label", required=True, help="label column, e.g. compress_class")
    pairs.add_argument("--n", type=int, required=True, help="number of pairs")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--out", required=True, help="output Parquet file")
    _overwrite_option(pairs)
    imported = _command(data_commands, "import",
                        "import your own labelled images (folder + CSV, or Parquet) as pairs",
                        _data_import)
    source = imported.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (with --labels CSV)")
    source.add_argument("--parquet", help="Parquet table with an image and a label column")
    imported.add_argument("--labels", help="CSV of file_name,label rows (paths under --images)")
    imported.add_argument("--out", required=True, help="output pair-set Parquet file")
    imported.add_argument("--name", help="name of the new label y (default: the label column)")
    imported.add_argument("--classes", help="class names in class order, comma-separated "
                          "(default: 0..max for integers, sorted names otherwise)")
    imported.add_argument("--size", type=int, help="resize every image to SIZE x SIZE")
    imported.add_argument("--channels", type=int, choices=(1, 3),
                          help="1 grayscale, 3 RGB (default: RGB if any image has colour)")
    imported.add_argument("--heldout", type=float, default=0.2,
                          help="stratified share of every class held out (default 0.2)")
    imported.add_argument("--seed", type=int, default=0)
    imported.add_argument("--label-column", help="label column (default: label)")
    imported.add_argument("--image-column", default="image", help="Parquet image column")
    imported.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    pretrain = _command(commands, "pretrain", "pre-train the digits base model p_pre(x | c)",
                        _pretrain)
    _config_options(pretrain)

    reward = commands.add_parser("reward", help="the reward classifier p(y | x0)")
    reward_commands = reward.add_subparsers(title="reward commands", metavar="COMMAND")
    _config_options(_command(reward_commands, "train",
                             "train and calibrate the reward on N offline pairs", _reward_train))
    audit = _command(reward_commands, "audit",
                     "what the reward can buy: the exact optimum at each gamma/alpha, no training",
                     _reward_audit)
    _config_options(audit, required=False)
    audit.add_argument("--base", help="base model directory or models:/ URI (base_model)")
    audit.add_argument("--reward", action="append", help="reward directory (repeat: multi-task)")
    audit.add_argument("--judge", help="digit judge directory ('' for none)")
    audit.add_argument("--guidance-levels", help="gamma/alpha values, e.g. 1,3,10,30,100")
    audit.add_argument("--samples", type=int, help="base samples per context")
    audit.add_argument("--steps", type=int, help="sampler steps")
    audit.add_argument("--out", help="output folder (output_dir)")

    finetune = _command(commands, "finetune", "CTRL fine-tuning of the base model", _finetune)
    _config_options(finetune)
    finetune.add_argument("--workers", type=int, help="Ray rollout workers (0: one process)")
    finetune.add_argument("--mode", choices=("auto", "adjoint", "pathwise", "ppo", "value"),
                          help="update rule (default auto: chosen from the exact optimum)")
    resume = finetune.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const=True, default=False,
                        help="continue from the newest checkpoint in output_dir (error if none)")
    resume.add_argument("--resume-if-present", dest="resume", action="store_const",
                        const="if-present",
                        help="continue from the newest checkpoint if there is one, else start")
    finetune.add_argument("--allow-config-change", action="store_true",
                          help="resume even if the config changes training (recorded in the "
                               "MLflow run's resume_changes tag)")
    finetune.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")

    evaluate = _command(commands, "evaluate", "score a fine-tuned policy by the protocol",
                        _evaluate)
    evaluate.add_argument("--model", required=True,
                          help="CTRL checkpoint directory or models:/NAME@ALIAS")
    _config_options(evaluate, required=False)

    baseline = _command(commands, "baseline", "train and evaluate a guidance baseline",
                        _baseline)
    baseline.add_argument("kind", choices=("cfg", "cg", "dps"),
                          help="classifier-free guidance, classifier guidance, or DPS")
    _config_options(baseline)

    tune = _command(commands, "tune", "Ray Tune sweep over the KL weight", _tune)
    _config_options(tune)

    registry = commands.add_parser("registry", help="the MLflow model registry")
    registry_commands = registry.add_subparsers(title="registry commands", metavar="COMMAND")
    _command(registry_commands, "list", "registered models, versions and aliases",
             _registry_list)
    promote = _command(registry_commands, "promote", "point NAME@ALIAS at VERSION",
                       _registry_promote)
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("alias")
    register = _command(registry_commands, "register",
                        "register a CTRL policy directory as a new model version",
                        _registry_register)
    register.add_argument("--policy", required=True, help="CTRL policy directory")
    register.add_argument("--name", default="ctrl-digits")
    register.add_argument("--alias", default="champion")
    register_base = _command(registry_commands, "register-base",
                             "register a base-model directory (e.g. a Stable-Diffusion-format "
                             "pipeline) as a new model version", _registry_register_base)
    register_base.add_argument("--model", required=True, help="base-model directory")
    register_base.add_argument("--name", required=True)
    register_base.add_argument("--alias", default=None)

    text = commands.add_parser("text2image", help="text-to-image (Stable-Diffusion-format) models")
    text_commands = text.add_subparsers(title="text2image commands", metavar="COMMAND")
    tiny = _command(text_commands, "tiny-pipeline",
                    "write a small SD-format pipeline with random weights (offline)",
                    _text2image_tiny_pipeline)
    _config_options(tiny, required=False)
    tiny.add_argument("--out", required=True, help="pipeline directory to write")
    testbed = _command(text_commands, "build",
                       "train the latent text-to-image testbed (VAE + UNet on the digits) and "
                       "save it as an SD-format pipeline", _text2image_build)
    _config_options(testbed)
    flow = commands.add_parser("flow", help="flow-matching (Stable-Diffusion-3-format) models")
    flow_commands = flow.add_subparsers(title="flow commands", metavar="COMMAND")
    flow_build = _command(flow_commands, "build",
                          "train the flow testbed (an SD3 transformer on the latent testbed's "
                          "latents and prompts) and save it as an SD3-format pipeline",
                          _flow_build)
    _config_options(flow_build)

    sample = _command(commands, "sample", "draw samples for a context c and label y", _sample)
    sample.add_argument("--model", required=True,
                        help="CTRL checkpoint directory, base-model directory or models:/ URI")
    context = sample.add_mutually_exclusive_group(required=True)
    context.add_argument("--c", type=int, help="context: digit, or prompt index of a text model")
    context.add_argument("--prompt", help="prompt (text-to-image models)")
    sample.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance on the prompt (text-to-image models; "
                             "default: the model's own)")
    sample.add_argument("--allow-other-chain", action="store_true",
                        help="sample a value policy with another guidance scale than its head "
                             "was fitted on (its steering no longer matches)")
    sample.add_argument("--y", default="-1",
                        help="new label class: index or class name (-1: unconditional)")
    sample.add_argument("--n", type=int, default=16)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="PNG grid to write")
    _overwrite_option(sample)
    return parser


def _command(commands, name: str, help_text: str, handler: Callable) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def _config_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable)")
    _overwrite_option(parser)


def _overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output artifacts (default: refuse)")


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=str))


def _demo(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.demo_config import DemoConfig

    config = load_config(DemoConfig, args.config, args.overrides)
    preflight.demo(config, args.overwrite)
    from ctrl_ray.demo import run_demo

    run_demo(config, overwrite=args.overwrite)


def _data_build_digits(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight

    preflight.build_digits(args.out, args.seed, args.overwrite)
    from ctrl_ray.data.digits import build_digits, load_digits_dataset

    path = build_digits(args.out, size=args.size, seed=args.seed)
    dataset = load_digits_dataset(path)
    print(f"wrote {path}: {len(dataset)} images of shape {dataset.image_shape}")
    for name, info in dataset.label_info.items():
        print(f"  {name}: edges {info['edges']}")


def _data_pairs(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.data.pairs import load_pairs, make_pairs

    preflight.pairs(args.dataset, args.label, args.n, args.seed, args.out, args.overwrite)
    path = make_pairs(args.dataset, args.label, args.n, args.out, seed=args.seed)
    pairs = load_pairs(path)
    print(f"wrote {path}: {len(pairs)} pairs labelled {pairs.label_name!r} "
          f"({pairs.num_classes} classes)")


def _data_import(args: argparse.Namespace) -> None:
    from ctrl_ray.data.importing import ImportOptions, describe, import_folder, import_parquet

    classes = None if args.classes is None else args.classes.split(",")
    options = ImportOptions(label_name=args.name, classes=classes, size=args.size,
                            channels=args.channels, heldout_fraction=args.heldout,
                            seed=args.seed, overwrite=args.overwrite)
    if args.images is not None:
        if args.labels is None:
            raise InputError("--labels: give the CSV of file_name,label rows for --images")
        pairs = import_folder(args.images, args.labels, args.out, options, args.label_column,
                              progress=True)
    else:
        if args.labels is not None:
            raise InputError("--labels: goes with --images; a --parquet table holds its labels")
        pairs = import_parquet(args.parquet, args.out, options, args.image_column,
                               args.label_column or "label", progress=True)
    print(f"wrote {args.out}: " + "\n".join(describe(pairs)))


def _pretrain(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.pretrain_config import PretrainConfig

    config = load_config(PretrainConfig, args.config, args.overrides)
    preflight.pretrain(config, args.overwrite)
    from ctrl_ray.pretrain import pretrain

    result = pretrain(config)
    print(f"saved {result.model_dir} (final loss {result.final_loss:.4f}, "
          f"{result.steps_per_second:.2f} steps/s)")
    if result.model_uri:
        print(f"registered {result.model_uri}")



def _reward_train(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.reward_config import RewardJobConfig

    config = load_config(RewardJobConfig, args.config, args.overrides)
    preflight.reward(config, args.overwrite)
    from ctrl_ray.reward_training import train_reward_job

    result = train_reward_job(config)
    accuracy = "no test rows" if result["test_accuracy"] is None else \
        f"test accuracy {result['test_accuracy']:.3f} on {result['test_on']}"
    print(f"saved {result['output_dir']}: label {result['label']!r} classes "
          f"{result['class_names']}; {accuracy}, temperature {result['temperature']:.2f}")
    if "heldout_ece" in result:
        print(f"  held-out calibration: NLL {result['heldout_nll']:.3f}, "
              f"ECE {result['heldout_ece']:.3f}")
    scorer = {"oracle": "its built-in oracle", "labeller": "your labeller",
              "judge": f"the held-out judge (accuracy {result.get('judge_accuracy', 0):.3f} on "
                       f"the reward's train rows)",
              "none": "nothing yet (no held-out rows, no labeller)"}[result["scorer"]]
    print(f"  samples of this label will be scored by {scorer}")


def _reward_audit(args: argparse.Namespace) -> None:
    from ctrl_ray.audit_config import AuditConfig, check_audit
    from ctrl_ray.config import load_config

    overrides = list(args.overrides)
    for key, value in (("base_model", args.base), ("judge", args.judge),
                       ("optimum.samples_per_context", args.samples),
                       ("optimum.num_inference_steps", args.steps), ("output_dir", args.out)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.reward:
        overrides.append("rewards=[" + ", ".join(f"{{path: '{p}'}}" for p in args.reward) + "]")
    if args.guidance_levels:
        overrides.append(f"optimum.guidance_levels=[{args.guidance_levels}]")
    config = load_config(AuditConfig, args.config, overrides)
    check_audit(config, args.overwrite)
    from ctrl_ray.audit import run_audit

    run_audit(config, overwrite=args.overwrite)


def _finetune(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_raw
    from ctrl_ray.rule_choice import resolve

    overrides = list(args.overrides)
    for key, value in (("distributed.workers", args.workers), ("mode", args.mode),
                       ("distributed.address", args.address)):
        if value is not None:
            overrides.append(f"{key}={value}")
    raw = load_raw(args.config, overrides)
    config, rule_open = resolve(raw, args.resume)
    preflight.finetune(config, args.overwrite, resume=args.resume,
                       allow_config_change=args.allow_config_change)
    from ctrl_ray.finetune import run_checked  # torch, Ray, MLflow: only once the input is good

    result = run_checked(raw, config, rule_open, resume=args.resume, overwrite=args.overwrite,
                         allow_config_change=args.allow_config_change)
    print(f"saved {result['policy_dir']} ({result['train_seconds']:.0f} s of training)")


def _evaluate(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.finetune_config import FinetuneConfig

    config = load_config(FinetuneConfig, args.config, args.overrides)
    preflight.evaluate(args.model, config, args.overwrite)
    from ctrl_ray.policy import evaluate_model

    report = evaluate_model(args.model, config.evaluation, config.judge, config.output_dir)
    _print_json({k: v for k, v in report.items() if k != "labels"})


def _sample(args: argparse.Namespace) -> None:
    import os
    from pathlib import Path

    from ctrl_ray import preflight

    text = args.y.strip()
    label = int(text) if text.lstrip("+-").isdigit() else text  # a class index or name
    # A class name is checked against the model's names in sample_grid.
    preflight.sample(args.model, args.n, args.seed, label if isinstance(label, int) else -1,
                     args.guidance_scale, args.out, args.overwrite)
    from ctrl_ray.policy import sample_grid

    context = args.prompt if args.prompt is not None else args.c
    out = Path(args.out)
    staging = out.with_name(f".{out.stem}.{os.getpid()}.tmp.png")  # moved into place at the end
    try:
        sample_grid(args.model, context=context, label=label, count=args.n, seed=args.seed,
                    out=staging, guidance_scale=args.guidance_scale,
                    allow_other_chain=args.allow_other_chain)
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    print(f"wrote {out}")



def _baseline(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.baseline_config import load_baseline_config

    config = load_baseline_config(args.kind, args.config, args.overrides)
    preflight.baseline(args.kind, config, args.overwrite)
    from ctrl_ray.baselines.run import run_baseline

    result = run_baseline(args.kind, config)
    _print_json({k: v for k, v in result[args.kind].items() if k != "labels"})


def _tune(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.tuning.configs import TuneConfig

    config = load_config(TuneConfig, args.config, args.overrides)
    preflight.tune(config, args.overwrite)
    from ctrl_ray.tuning import run_sweep

    result = run_sweep(config)
    print(result.table_markdown.read_text())
    if result.model_uri:
        print(f"registered the best trial as {result.model_uri}")


def _registry_list(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight

    preflight.registry_store()
    from ctrl_ray.registry import list_registered

    rows = list_registered()
    if not rows:
        print("no registered models")
    for row in rows:
        aliases = f"  @{', @'.join(row['aliases'])}" if row["aliases"] else ""
        print(f"{row['name']:<24} v{row['version']:<4} run {row['run_id']}{aliases}")


def _registry_promote(args: argparse.Namespace) -> None:
    from ctrl_ray.registry import promote

    promote(args.name, args.version, args.alias)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")


def _registry_register_base(args: argparse.Namespace) -> None:
    from ctrl_ray.registry import register_base_model

    uri = register_base_model(args.model, args.name, args.alias)
    print(f"registered {uri}" + (f" (alias {args.alias})" if args.alias else ""))


def _text2image_tiny_pipeline(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.models.tiny_pipeline_config import TinyPipelineConfig

    config = load_config(TinyPipelineConfig, args.config, args.overrides)
    preflight.tiny_pipeline(args.out, args.overwrite)
    from ctrl_ray.models.tiny_pipeline import build_tiny_pipeline

    path = build_tiny_pipeline(config, args.out)
    print(f"wrote {path}")


def _text2image_build(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.latent_testbed_config import LatentTestbedConfig

    config = load_config(LatentTestbedConfig, args.config, args.overrides)
    preflight.latent_testbed(config, args.overwrite)
    from ctrl_ray.latent_testbed import build_latent_testbed

    result = build_latent_testbed(config)
    print(f"saved {result.model_dir} (VAE {result.vae_seconds:.0f} s, validation PSNR "
          f"{result.val_psnr:.1f} dB; UNet {result.unet_seconds:.0f} s, final loss "
          f"{result.unet_loss:.4f})")
    if result.model_uri:
        print(f"registered {result.model_uri}")


def _flow_build(args: argparse.Namespace) -> None:
    from ctrl_ray import preflight
    from ctrl_ray.config import load_config
    from ctrl_ray.flow_testbed_config import FlowTestbedConfig

    config = load_config(FlowTestbedConfig, args.config, args.overrides)
    preflight.flow_testbed(config, args.overwrite)
    from ctrl_ray.flow_testbed import build_flow_testbed

    result = build_flow_testbed(config)
    print(f"saved {result.model_dir} (transformer {result.num_parameters / 1e6:.2f} M "
          f"parameters, {result.seconds:.0f} s, final loss {result.final_loss:.4f})")
    if result.model_uri:
        print(f"registered {result.model_uri}")


def _registry_register(args: argparse.Namespace) -> None:
    from ctrl_ray.registry import register_policy

    uri = register_policy(args.policy, args.name, args.alias)
    print(f"registered {uri} (alias {args.alias})")


if __name__ == "__main__":
    sys.exit(main())
