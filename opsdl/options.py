"""Declaring command options once: a dataclass field with its help, read by ``opsdl.cli``."""
from __future__ import annotations

from dataclasses import field
from typing import Any, Optional


def option(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})
