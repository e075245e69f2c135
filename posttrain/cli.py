"""The `posttrain` command: `posttrain <command> [--config x.yaml] [key=value ...]`.

Every recipe command takes a YAML config plus dotted overrides, `--dry-run` to print the
resolved config and stop, and `--help` to list every config field with its documentation.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from posttrain.config import ConfigError, config_help, dump_config, load_config
from posttrain.data.records import DataError
from posttrain.rewards.base import RewardSetupError

# command -> (module, config class, one-line description); each module has `run(config)`.
RECIPES: dict[str, tuple[str, str, str]] = {
    "sft": ("posttrain.recipes.sft", "SFTConfig", "supervised fine-tuning on demonstrations"),
    "rm": (
        "posttrain.recipes.rm",
        "RMConfig",
        "train a reward model on preference pairs or rankings",
    ),
    "dpo": (
        "posttrain.recipes.dpo",
        "DPOConfig",
        "direct preference optimization: DPO, IPO, robust/cDPO, hinge, SimPO, ORPO, KTO",
    ),
    "iterative-dpo": (
        "posttrain.recipes.iterative_dpo",
        "IterativeDPOConfig",
        "rounds of sampling the policy, pairing its best and worst answers by reward, and DPO",
    ),
    "grpo": (
        "posttrain.recipes.grpo",
        "GRPOConfig",
        "group-relative online RL with verifiable rewards: GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++",
    ),
    "ppo": (
        "posttrain.recipes.ppo",
        "PPOConfig",
        "RLHF with PPO: a reward model (or verifiers), a critic, per-token KL to the SFT policy",
    ),
    "rft": (
        "posttrain.recipes.rft",
        "RFTConfig",
        "rejection-sampling fine-tuning: rounds of sampling, keeping verified answers, and SFT",
    ),
    "prm": (
        "posttrain.recipes.prm",
        "PRMConfig",
        "a process reward model: step labels by Monte-Carlo rollouts (Math-Shepherd), then training",
    ),
    "best-of-n": (
        "posttrain.recipes.best_of_n",
        "BestOfNConfig",
        "pick among N samples by a verifier, reward model, PRM or majority vote; pass@k table",
    ),
    "label": (
        "posttrain.recipes.label",
        "LabelConfig",
        "sample responses and have an AI judge turn them into preference pairs or rankings",
    ),
    "pipeline": (
        "posttrain.recipes.pipeline",
        "PipelineConfig",
        "the whole pipeline: SFT, labelled rankings, reward model, PPO, DPO, GRPO, report.html",
    ),
    "quickstart": (
        "posttrain.recipes.pipeline",
        "QuickstartConfig",
        "the whole pipeline on a tiny model built offline, with a report (runs/quickstart)",
    ),
    "arithmetic": (
        "posttrain.recipes.arithmetic",
        "ArithmeticConfig",
        "build a tiny model, SFT it on generated arithmetic, report loss and accuracy",
    ),
}


def _recipe_parser(name: str, config_cls) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"posttrain {name}",
        description=RECIPES[name][2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (set in the YAML file or as key=value):\n" + config_help(config_cls),
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def _demo_data(argv: list[str]) -> int:
    from posttrain.tasks import demo

    parser = argparse.ArgumentParser(
        prog="posttrain demo-data",
        description="Write the datasets the examples read, offline.",
        epilog=demo.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", help="directory to write them to (e.g. runs/data)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in demo.write_demo_data(args.out, args.seed):
        print(path)
    return 0


def _tiny_model(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="posttrain tiny-model",
        description="Build a deterministic random causal LM and byte-level tokenizer, offline.",
    )
    parser.add_argument("out", help="directory to write the Hugging Face model to")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from posttrain.models.tiny import save_tiny

    print(save_tiny(args.out, args.arch, args.size, args.seed))
    return 0


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="posttrain serve",
        description="Serve a model over an OpenAI-compatible HTTP API (docs/serve.md).",
    )
    parser.add_argument("model_dir", help="a Hugging Face model directory (e.g. runs/sft/final)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="default 8000")
    parser.add_argument("--model-name", help="the name clients send (default: the directory's)")
    parser.add_argument(
        "--api-key-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on requests"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its sampler call (default 10)",
    )
    parser.add_argument(
        "--max-batch-rows", type=int, default=64, help="prompts x n per sampler call (default 64)"
    )
    parser.add_argument(
        "--max-model-len", type=int, help="prompt + max_tokens at most (default: the model's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    args = parser.parse_args(argv)
    from posttrain.serve.app import serve

    try:
        serve(**{k: v for k, v in vars(args).items() if v is not None})
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        **{k: v[2] for k, v in RECIPES.items()},
        "tiny-model": "build a tiny random model and byte-level tokenizer, offline",
        "demo-data": "write the datasets the examples read, offline",
        "serve": "serve a model over an OpenAI-compatible HTTP API",
        "feedback": "the human-feedback app: serve it, create projects and tokens, export labels",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: posttrain <command> [--config FILE] [--dry-run] [key=value ...]\n")
        print("commands:")
        for name, about in commands.items():
            print(f"  {name:<14} {about}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    if command == "tiny-model":
        return _tiny_model(rest)
    if command == "demo-data":
        return _demo_data(rest)
    if command == "serve":
        return _serve(rest)
    if command == "feedback":
        from posttrain.feedback.cli import main as feedback_main

        return feedback_main(rest)
    module_name, class_name, _ = RECIPES[command]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, class_name)
    args = _recipe_parser(command, config_cls).parse_args(rest)
    try:
        config = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_config(config), end="")
        return 0
    try:
        module.run(config)
    except (DataError, FileNotFoundError, ConfigError, RewardSetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
