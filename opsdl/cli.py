"""`opsdl train | prepare | eval`: argument parsing only."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Optional, Sequence

from .eval import EvalConfig
from .prepare import PrepareConfig
from .train import TrainConfig


def _add_config_arguments(parser: argparse.ArgumentParser, config_type) -> None:
    """One --flag per dataclass field, typed by its annotation, documented by its metadata."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        parser.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"),
                            help=f"{help_text} (default: {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsdl", description="On-Policy Self-Distillation for Long-context LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="OPSDL training (defaults: SmolLM2 on synthetic needles, CPU)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_arguments(train, TrainConfig)
    prepare = commands.add_parser("prepare", help="(long context, short context, question) triplets from your documents",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_arguments(prepare, PrepareConfig)
    evaluate = commands.add_parser("eval", help="accuracy by context length on the synthetic tasks",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_config_arguments(evaluate, EvalConfig)
    return parser


COMMANDS = {"train": TrainConfig, "prepare": PrepareConfig, "eval": EvalConfig}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config_type = COMMANDS[args.command]
    config = config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})
    if args.command == "train":
        from .train import train as run
    elif args.command == "prepare":
        from .prepare import prepare as run
    else:
        from .eval import evaluate as run
    try:
        run(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"opsdl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
