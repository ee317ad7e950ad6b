"""`opsdl train | prepare | eval | export`: argument parsing and the checks that need no torch.
torch, transformers and triton load once a command runs, never for ``--help`` or a refused option:
``main`` runs ``check_before_loading`` before it imports the command's module, and nothing this
module imports at its top imports torch (``tests/trainer/test_cli.py`` runs the command and looks)."""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from .data import check_input_file
from .files import check_output_dir
from .options import EvalConfig, ExportConfig, PrepareConfig, TrainConfig, check_train_options


def _flags(f: dataclasses.Field) -> list[str]:
    """--kebab-case, the field's own snake_case (the Hugging Face spelling), and declared aliases."""
    flags = ["--" + f.name.replace("_", "-")]
    if "_" in f.name:
        flags.append("--" + f.name)
    return flags + [a for a in f.metadata.get("aliases", ()) if a not in flags]


def _add_config_arguments(parser: argparse.ArgumentParser, config_type) -> None:
    """One option per dataclass field, typed by its annotation, documented by its metadata; the
    help formatter adds each default once."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        kind = hints[f.name]
        common = dict(dest=f.name, default=f.default, help=f.metadata.get("help", ""))
        if kind is bool or kind == Optional[bool]:  # Optional: None means "decide by the machine"
            parser.add_argument(*_flags(f), action=argparse.BooleanOptionalAction, **common)
            continue
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        extra = {"nargs": f.metadata["nargs"], "const": f.metadata["const"]} if f.metadata.get("nargs") else {}
        parser.add_argument(*_flags(f), type=kind, choices=f.metadata.get("choices"), **extra, **common)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsdl", description="On-Policy Self-Distillation for Long-context LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, config_type, summary in (
        ("train", TrainConfig, "OPSDL training (defaults: SmolLM2 on synthetic needles, CPU)"),
        ("prepare", PrepareConfig, "(long context, short context, question) triplets from your documents"),
        ("eval", EvalConfig, "accuracy by context length: our synthetic tasks or RULER (offline)"),
        ("export", ExportConfig, "the consolidated model of any checkpoint of a torchrun run (one process)"),
    ):
        sub = commands.add_parser(name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_config_arguments(sub, config_type)
    return parser


COMMANDS = {"train": TrainConfig, "prepare": PrepareConfig, "eval": EvalConfig, "export": ExportConfig}
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_memory_to_the_system() -> None:
    """A fixed 1 MiB mmap threshold for glibc's malloc. By default the threshold grows (up to 32 MiB)
    as large blocks are freed, after which a step's activations come from the heap and stay in the
    process when freed: the default ``opsdl train`` peaked 1.3 GiB above its live tensors (4666
    against 3319 MiB). With the threshold fixed, each large tensor is returned when freed. Skipped
    off glibc, and when MALLOC_MMAP_THRESHOLD_ is set (the user's choice wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # musl and other C libraries: nothing to set
        pass


def check_before_loading(command: str, config) -> None:
    """Every check of a command's options that needs no torch: a refused option answers at once
    (a ValueError naming the option, what it expects and what it got). The commands run their own
    checks again (they are also called from Python), and then the ones that need torch: the model
    source, the device, a checkpoint's contents."""
    if command == "train":
        check_train_options(config)
        if config.data:
            check_input_file("--data", config.data)
        if "WORLD_SIZE" not in os.environ:  # under torchrun rank 0 alone claims --out, maybe before the others look
            check_output_dir(Path(config.out), bool(config.resume), config.overwrite_output_dir)
    elif command == "prepare":
        from .prepare import check_prepare_options  # torch-free: prepare imports torch when it runs

        check_prepare_options(config)
    elif command == "eval":
        from .eval import check_eval_options  # torch-free likewise

        check_eval_options(config)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    config_type = COMMANDS[args.command]
    config = config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})
    try:
        check_before_loading(args.command, config)
    except (ValueError, FileNotFoundError) as e:
        print(f"opsdl {args.command}: error: {e}", file=sys.stderr)
        return 2
    return_freed_memory_to_the_system()
    try:
        if args.command == "train" and "WORLD_SIZE" in os.environ:  # started by torchrun
            from .train_fsdp import train_fsdp as run
        elif args.command == "train":
            from .train import train as run
        elif args.command == "prepare":
            from .prepare import prepare as run
        elif args.command == "export":
            from .fsdp_checkpoint import export as run
        else:
            from .eval import evaluate as run
        run(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"opsdl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nopsdl {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
