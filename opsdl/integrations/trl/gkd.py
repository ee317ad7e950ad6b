r"""``FusedGKDTrainer``: TRL's GKD trainer (``trl.experimental.gkd.GKDTrainer``) with its loss computed
by ``opsdl_kernels.fused_kl_loss`` from the final hidden states, never the (B, T, V) logits.

Everything else is TRL's: the ChatML collator, on-policy generation (``lmbda``), ``seq_kd``,
logging, checkpointing, PEFT. GKD's loss at ``beta`` 0 or 1, with the causal shift (the state at
position t predicts token t + 1) and TRL's temperature of 1 (GKD's ``compute_loss`` never passes
``temperature``, which is the sampling temperature), is

    loss = (1 / N) * sum_{rows r with labels[r + 1] != -100} D(r)
    D(r) = KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))     beta = 0 (forward KL)
    D(r) = KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))     beta = 1 (reverse KL)

with ``p_s = softmax(cap(h_s W_s^T + b_s))`` and ``p_t`` likewise from the teacher's own hidden
states and lm-head; ``N`` is ``num_items_in_batch`` when the Trainer passes it, else the number of
counted rows (at least 1). The mixture JSD of ``0 < beta < 1`` is not what the kernels compute.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from trl.experimental.gkd import GKDConfig, GKDTrainer

from opsdl_kernels import fused_kl_loss

from .hidden import final_hidden, output_head, refuse_sharded_weights

FUSED_BETAS = (0.0, 1.0)


def check_beta(beta: Any) -> float:
    """GKD's ``beta`` as the kernels' ``reverse_weight``: 0.0 (forward KL) or 1.0 (reverse KL)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or float(beta) not in FUSED_BETAS:
        raise ValueError(f"beta: FusedGKDTrainer fuses GKD's beta=0.0 (forward KL(teacher||student)) or beta=1.0 "
                         f"(reverse KL(student||teacher)), not the mixture JSD of 0 < beta < 1; got {beta!r}")
    return float(beta)


class FusedGKDTrainer(GKDTrainer):
    """TRL's ``GKDTrainer`` with the same loss (``beta`` 0.0 or 1.0) computed by the fused kernels:
    the final hidden states (B, T, H) and the kernels' bounded working memory (chunks of fp32 logits
    within 1 GiB by default) instead of TRL's several (B, T, V) tensors. Arguments as
    ``GKDTrainer``'s. Both sides are computed in the student's hidden-state dtype: the student's
    head cast with autograd (nothing to do when they match), the teacher's states and own head cast
    detached. Refused: ``beta`` strictly between 0 and 1 (GKD's default 0.5), an lm-head
    adapted by PEFT, a teacher whose final-logit softcap differs from the student's, FSDP and
    DeepSpeed ZeRO-3 (the kernels read each lm-head's whole weight outside the forward).

    ``compute_loss(..., return_outputs=True)`` raises: TRL returns the student's outputs with its
    (B, T, V) logits, which this trainer never forms. Evaluation without ``compute_metrics`` (the
    loss only) does not ask for them; ``predict`` and ``compute_metrics`` would.
    """

    def __init__(self, model: Union[PreTrainedModel, nn.Module, str, None] = None,
                 teacher_model: Union[PreTrainedModel, nn.Module, str, None] = None,
                 args: Optional[GKDConfig] = None, *more: Any, **kwargs: Any) -> None:
        if not isinstance(args, GKDConfig):
            raise TypeError(f"args: expected a GKDConfig, got {type(args).__name__}")
        check_beta(args.beta)
        super().__init__(model, teacher_model, args, *more, **kwargs)
        refuse_sharded_weights(self, "FusedGKDTrainer")
        head, teacher_head = output_head(self.model), output_head(self.teacher_model)  # refuses a PEFT'd head
        if teacher_head.softcap != head.softcap:
            raise ValueError(f"teacher_model: its final-logit softcap {teacher_head.softcap} differs from the "
                             f"student's {head.softcap}; the fused loss applies one softcap to both")

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Union[Tensor, int, None] = None) -> Tensor:
        """GKD's loss (module docstring) over the rows whose next label is not -100."""
        if return_outputs:
            raise ValueError("return_outputs: FusedGKDTrainer never forms the student's (B, T, V) logits that "
                             "GKDTrainer returns as outputs; evaluate the loss only (no compute_metrics, "
                             "prediction_loss_only=True)")
        reverse_weight = check_beta(self.beta)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        student_hidden = final_hidden(model, input_ids, attention_mask)[:, :-1]
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = final_hidden(self.teacher_model, input_ids, attention_mask)[:, :-1]
        mask = inputs["labels"][:, 1:] != -100

        head, teacher_head = output_head(model), output_head(self.teacher_model)
        dtype = student_hidden.dtype
        weight = head.weight.to(dtype)  # autograd-tracked when it casts: the gradient reaches the weight
        bias = None if head.bias is None else head.bias.to(dtype)
        shared = teacher_head.weight is head.weight  # the student passed as its own teacher
        teacher_weight = None if shared else teacher_head.weight.detach().to(dtype)
        teacher_bias = None if teacher_head.bias is None else teacher_head.bias.detach().to(dtype)
        loss_sum = fused_kl_loss(
            student_hidden.reshape(-1, student_hidden.shape[-1]),
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype), weight, teacher_weight,
            reverse_weight=reverse_weight, mask=mask.reshape(-1), bias=bias, teacher_bias=teacher_bias,
            softcap=head.softcap, reduction="sum")

        # TRL's reduction: the sum over the global count the Trainer passes (gradient accumulation),
        # else the mean over the counted rows; no counted row gives 0, still attached to the graph
        if num_items_in_batch is not None:
            if isinstance(num_items_in_batch, Tensor):
                num_items_in_batch = num_items_in_batch.to(loss_sum.device)
            return loss_sum / num_items_in_batch
        return loss_sum / mask.sum().clamp_min(1)
