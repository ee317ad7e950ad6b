"""The output folder of a training run: checkpoints written so a kill never costs more than the
step in flight, the ``latest`` pointer, pruning, and the log kept in step with the checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from .files import check_output_dir, sync_folder, write_atomic
from .options import TrainConfig

LOG = "log.jsonl"
LATEST = "latest"
STATE = "trainer_state.pt"
SHARDS = "shards"  # a sharded run's checkpoint (torch.distributed.checkpoint), opsdl.fsdp_checkpoint
_CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def claim_output_dir(out: Path, cfg: TrainConfig) -> None:
    """A run starts in an empty (or new) folder; a non-empty one only with --resume, or with
    --overwrite-output-dir, which removes its log and checkpoints first."""
    entries = check_output_dir(out, bool(cfg.resume), cfg.overwrite_output_dir)
    if entries and not cfg.resume:
        for name in entries:
            path = out / name
            if name in (LOG, LATEST) or _CHECKPOINT.match(name.removeprefix(".tmp-")):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def resume_point(out: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to continue from: --resume alone means the latest in --out (none yet: a fresh
    start), --resume PATH that checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(out)
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ValueError(f"--resume {resume}: expected a checkpoint folder holding {STATE} "
                         f"(such as {out}/checkpoint-000010), got {'no such folder' if not path.exists() else 'none'}")
    return path


def latest_checkpoint(out: Path) -> Optional[Path]:
    pointer = out / LATEST
    return out / pointer.read_text().strip() if pointer.exists() else None


def save_checkpoint(out: Path, step: int, model, tokenizer, optimizer: Optional[torch.optim.Optimizer],
                    ema_teacher, cfg: TrainConfig) -> Path:
    """checkpoint-<step>/ (safetensors weights, tokenizer, trainer state with the optimizer unless
    --no-save-optimizer, EMA teacher): written under a temporary name, synced, renamed, then the
    ``latest`` pointer replaced: a kill at any moment leaves the previous checkpoint intact."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if ema_teacher is not None:
        ema_teacher.save_pretrained(tmp / "ema", safe_serialization=True)
    torch.save({"step": step, "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "config": dataclasses.asdict(cfg)}, tmp / STATE)
    sync_folder(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomic(out / LATEST, final.name)
    return final


def prune_checkpoints(out: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints (0: keep all); never the latest one."""
    if keep <= 0:
        return []
    found = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir())
    latest = latest_checkpoint(out)
    removed = [p for _, p in found[:-keep] if p != latest]
    for path in removed:
        shutil.rmtree(path)
    return removed


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / SHARDS).is_dir()


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE, weights_only=False)


def rewind_log(out: Path, step: int) -> None:
    """On resume: drop the log lines of steps after the checkpoint (they are run again)."""
    log = out / LOG
    if log.exists():
        kept = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_atomic(log, "".join(line + "\n" for line in kept))


def append_log(out: Path, record: dict) -> None:
    with (out / LOG).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
