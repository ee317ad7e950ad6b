"""`opsdl train` (and the subcommands to come): argument parsing only."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Optional, Sequence

from .train import TrainConfig


def _add_config_arguments(parser: argparse.ArgumentParser, config_type) -> None:
    """One --flag per dataclass field, typed by its annotation, documented by its metadata."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import train

        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
        try:
            train(TrainConfig(**values))
        except (ValueError, FileNotFoundError) as e:
            print(f"opsdl train: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
