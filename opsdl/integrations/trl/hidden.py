"""Final hidden states of a causal LM at chosen positions, from the model's own forward (so that
DDP, DeepSpeed and PEFT wrappers run as usual) but without its N x V logits: the base model's
output is captured by a hook and the lm-head is asked for one position only."""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from ...model import LMHead, decoder, lm_head


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside accelerate/DDP/DeepSpeed (``.module``), torch.compile
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model: expected a transformers causal LM (possibly wrapped by accelerate or PEFT), got "
                         f"{type(model).__name__}")
    return model


def output_head(model: torch.nn.Module) -> LMHead:
    """The lm-head the fused loss reads: the plain linear layer's own weight. A head that PEFT
    replaced (``target_modules`` naming the lm-head) is refused: the loss would skip its adapter."""
    inner = causal_lm(model)
    layer = inner.get_output_embeddings()
    if layer is not None and hasattr(layer, "base_layer"):
        raise ValueError("peft_config: its target_modules include the lm-head; the fused loss reads the head's weight "
                         "directly and would skip the adapter: leave the lm-head out of target_modules (or merge it)")
    return lm_head(inner)


def refuse_sharded_weights(trainer, name: str, allow_fsdp2: bool = False) -> None:
    """FSDP1 and DeepSpeed ZeRO-3 shard every weight between forwards, and the fused loss reads each
    lm-head's whole weight after the forward: refused in one line, naming what works. FSDP2 (where
    ``allow_fsdp2``): accelerate puts the final norm and lm-head in a unit of their own that is not
    resharded after the forward, so the head read after it is whole (``whole_head`` checks)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    fsdp2 = trainer.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) == 2
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if (trainer.is_fsdp_enabled and not (fsdp2 and allow_fsdp2)) or zero3:
        what = "fsdp" if trainer.is_fsdp_enabled else "deepspeed"
        works = "DDP, DeepSpeed ZeRO-1/2" + (" or FSDP2 (fsdp_version 2)" if allow_fsdp2 else "")
        raise ValueError(f"{what}: {name} reads each lm-head's whole weight outside the model's forward, which "
                         f"{'FSDP1' if allow_fsdp2 else 'FSDP'} and ZeRO-3 shard; launch with {works} (or `opsdl "
                         "train` under torchrun for FSDP2)")


def whole_head(head: LMHead, trained: bool) -> LMHead:
    """The head as the fused loss needs it: whole on every rank. A ``trained`` head must be whole
    already (its gradient flows to it; a shard would be read as a vocabulary-parallel slice of rows
    that every rank shares, which data-parallel rows are not); a sharded constant head (a teacher's) is
    gathered."""
    if not isinstance(head.weight, DTensor):
        return head
    if trained:
        raise ValueError("fsdp: the student's lm-head is sharded after the forward (reshard_after_forward on its "
                         "unit); the fused loss needs it whole: keep the unit of the final norm and lm-head "
                         "unsharded after the forward (accelerate's FSDP2 default)")
    bias = head.bias.full_tensor() if isinstance(head.bias, DTensor) else head.bias
    return LMHead(head.weight.full_tensor(), bias, head.softcap)


@contextlib.contextmanager
def captured_final_hidden(model: torch.nn.Module) -> Iterator[list[Tensor]]:
    """While open, every forward of ``model`` appends its final hidden states (B, T, H), the base
    model's output after the final norm, to the yielded list."""
    captured: list[Tensor] = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder(causal_lm(model)).register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


_WARNED_FULL_LOGITS: set[str] = set()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    name = type(causal_lm(model)).__name__
    if "logits_to_keep" in inspect.signature(causal_lm(model).forward).parameters:
        return True
    if name not in _WARNED_FULL_LOGITS:
        _WARNED_FULL_LOGITS.add(name)
        warnings.warn(f"{name}.forward takes no logits_to_keep: each forward also computes its (B, T, V) logits, "
                      "which the fused loss never reads (memory and time spent for nothing)", stacklevel=3)
    return False


def final_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Optional[Tensor] = None) -> Tensor:
    """The final hidden states (B, T, H) at every position of ``input_ids`` (the state at position t
    predicts token t + 1). The model is called as a whole, with ``logits_to_keep=1`` where it
    accepts it: a (B, 1, V) slice of logits, not (B, T, V)."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    with captured_final_hidden(model) as captured:
        model(**kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"expected one forward of the base model, saw {len(captured)}")
    return captured[0]


def completion_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_length: int,
                      position_ids: Optional[Tensor] = None) -> Tensor:
    """The final hidden states (B, C, H) that predict the last ``completion_length`` tokens of each
    row of ``input_ids`` (the state at position t predicts token t + 1). The model is called as a
    whole, with ``logits_to_keep=1`` where it accepts it: a (B, 1, V) slice of logits, not (B, T, V)."""
    if completion_length < 1 or completion_length >= input_ids.shape[1]:
        raise ValueError(f"completion_length: expected 1 <= completion_length < {input_ids.shape[1]} (the sequence "
                         f"length), got {completion_length}")
    return final_hidden(model, input_ids, attention_mask, position_ids)[:, -completion_length - 1:-1, :]
