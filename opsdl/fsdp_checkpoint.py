"""Checkpoints of a sharded run, written with ``torch.distributed.checkpoint`` (DCP): every rank
writes its own part of the weights, the optimizer state and the EMA teacher into one folder; DCP
reshards on load, so a run resumes on the same or another number of ranks. The folder is
written under a temporary name and renamed by rank 0 after all ranks finished, as the single-
process checkpoints are. The last checkpoint also holds the consolidated model
(``save_pretrained``, written by rank 0), which plain transformers and ``opsdl eval`` load.

    checkpoint-000010/
      shards/            DCP: {"model", "optimizer" (unless --no-save-optimizer), "ema"}
      trainer_state.pt   step, config, world size
      config.json, tokenizer files; model.safetensors in the last checkpoint
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checkpoint import LATEST, SHARDS, STATE
from .files import sync_folder, write_atomic
from .fsdp import Policy, Ranks
from .options import ExportConfig, TrainConfig

T = TypeVar("T")


def on_main(ranks: Ranks, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and hand its result to every rank; an error it raises is raised
    on every rank, so that none waits in a collective for a rank that gave up."""
    outcome: list = [None, None]
    if ranks.main:
        try:
            outcome = [work(), None]
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it
            outcome = [None, e if isinstance(e, (ValueError, OSError)) else RuntimeError(f"rank 0: {e!r}")]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def save_sharded_checkpoint(out: Path, step: int, policy: Policy, tokenizer, optimizer: Optional[torch.optim.Optimizer],
                            ema: Optional[Policy], cfg: TrainConfig, ranks: Ranks, export: bool) -> Path:
    """checkpoint-<step>/ as the module docstring lays out; ``export`` adds the consolidated model."""
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"

    def fresh_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(ranks, fresh_tmp)
    model_state, optimizer_state = get_state_dict(policy, [optimizer] if optimizer is not None else [])
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer_state
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    dcp.save(state, checkpoint_id=tmp / SHARDS)
    whole_model = consolidated_state(policy) if export else None

    def publish() -> Path:
        if whole_model is not None:
            plain_model(policy.model, whole_model).save_pretrained(tmp, safe_serialization=True)
        else:
            policy.model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": None, "config": dataclasses.asdict(cfg), "world_size": ranks.world},
                   tmp / STATE)
        sync_folder(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(out / LATEST, final.name)
        return final

    return on_main(ranks, publish)


def consolidated_state(policy: Policy) -> Optional[dict]:
    """The whole model's state dict in CPU memory on rank 0 (None elsewhere), gathered one tensor at a
    time, with the transformers names (no ``model.`` prefix of the Policy)."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return {name.removeprefix("model."): tensor for name, tensor in full.items()}


def plain_model(sharded: PreTrainedModel, state: dict) -> PreTrainedModel:
    """A model of the sharded one's class and config around the gathered tensors (built on the meta
    device and assigned: no second copy), its ties made again, as ``save_pretrained`` expects."""
    with torch.device("meta"):
        plain = type(sharded)(sharded.config)
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.generation_config = sharded.generation_config
    return plain


def load_sharded_checkpoint(checkpoint: Path, policy: Policy, optimizer: torch.optim.Optimizer,
                            ema: Optional[Policy]) -> bool:
    """Fill the sharded model, the optimizer (when the checkpoint has its state; the answer) and the
    EMA teacher from ``checkpoint``, whatever number of ranks wrote it."""
    has_optimizer = _holds(checkpoint, "optimizer")
    if ema is not None and not _holds(checkpoint, "ema"):
        raise ValueError(f"--resume {checkpoint}: it holds no EMA teacher (the run it continues did not use "
                         "--teacher ema)")
    model_state, optimizer_state = get_state_dict(policy, [optimizer] if has_optimizer else [])
    state = {"model": model_state}
    if has_optimizer:
        state["optimizer"] = optimizer_state
    if ema is not None:
        state["ema"] = get_model_state_dict(ema)
    dcp.load(state, checkpoint_id=checkpoint / SHARDS)
    set_state_dict(policy, [optimizer] if has_optimizer else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}))
    if ema is not None:
        set_model_state_dict(ema, state["ema"])
    return has_optimizer


def _holds(checkpoint: Path, key: str) -> bool:
    metadata = dcp.FileSystemReader(str(checkpoint / SHARDS)).read_metadata()
    return any(name.split(".", 1)[0] == key for name in metadata.state_dict_metadata)


def export(cfg: ExportConfig) -> Path:
    """``opsdl export``: the consolidated model of any sharded checkpoint (an intermediate one, or
    that of a killed run), in one process without a process group: the model is built on the meta
    device from the checkpoint's config, given empty storage, and filled from the shards in place."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint: expected a checkpoint folder of a torchrun run, got none")
    checkpoint, out = Path(cfg.checkpoint), Path(cfg.out)
    if not (checkpoint / SHARDS / ".metadata").is_file():
        raise ValueError(f"--checkpoint {checkpoint}: expected a checkpoint of a torchrun run (holding "
                         f"{SHARDS}/.metadata), got {'no such folder' if not checkpoint.is_dir() else 'none'}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty; give a new folder")
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    model.to_empty(device="cpu")
    stored = set(dcp.FileSystemReader(str(checkpoint / SHARDS)).read_metadata().state_dict_metadata)
    wanted = {f"model.{name}": tensor for name, tensor in model.state_dict().items()
              if f"model.model.{name}" in stored}
    with warnings.catch_warnings():  # DCP says it assumes one process: so it is, by design
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": wanted}, checkpoint_id=checkpoint / SHARDS, no_dist=True)
    model.tie_weights()  # an output embedding tied to the input one was stored once
    loaded = {tensor.data_ptr() for tensor in wanted.values()}
    missing = sorted(name for name, tensor in model.state_dict().items() if tensor.data_ptr() not in loaded)
    if missing:
        raise ValueError(f"--checkpoint {checkpoint}: its shards lack {missing[:3]} of the model its config describes")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    sync_folder(out)
    print(f"opsdl export: {checkpoint} -> {out}")
    return out

