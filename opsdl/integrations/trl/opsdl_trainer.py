"""``OPSDLTrainer``: OPSDL on TRL's self-distillation trainer (SDFT's rollouts, teachers, logging,
checkpointing, launchers and PEFT), with two changes: the teacher reads its own short-context
prompt (not the student prompt plus something), and the loss is ``opsdl_kernels``' fused reverse
KL on the final hidden states at the response rows, never the (B, T, V) logits.

Per batch: the student answers the long-context ``prompt`` (TRL's ``generate``, or its vLLM modes)
-> the teacher scores [``teacher_prompt`` ; answer], no gradient -> the student scores [``prompt`` ;
answer] -> ``fused_rkl_loss`` at the answer's rows, summed and divided by the answer tokens of the
optimizer step (``opsdl train``'s token mean).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl.experimental.sdft import SDFTTrainer
from trl.experimental.sdft.teacher_sync import SyncTeacherModelCallback
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import pad

from opsdl_kernels import fused_rkl_loss, fused_token_logprobs

from ...model import load_model
from ...rollout import PLAIN_TEMPLATE
from .config import OPSDLConfig
from .hidden import causal_lm, completion_hidden, output_head, refuse_sharded_weights, whole_head
from .vllm_colocate import colocated_engine_start, reload_weights_on_cpu

PROMPT_COLUMNS = ("prompt", "teacher_prompt")
PREPARED_COLUMNS = ("long_context", "short_context", "question")  # what `opsdl prepare` writes


def check_columns(dataset: Optional[Dataset], name: str) -> None:
    """A dataset needs ``prompt`` and ``teacher_prompt``, or ``opsdl prepare``'s three fields."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_columns(part, f"{name}[{key!r}]")
        return
    columns = set(dataset.column_names or ())
    if not (set(PROMPT_COLUMNS) <= columns or set(PREPARED_COLUMNS) <= columns):
        raise ValueError(f"{name}: expected the columns {list(PROMPT_COLUMNS)} (the long-context prompt and the "
                         f"teacher's short-context prompt) or {list(PREPARED_COLUMNS)} (as `opsdl prepare` writes), "
                         f"got {sorted(columns)}")


class OPSDLTrainer(SDFTTrainer):
    """On-policy self-distillation for long context on TRL. ``model``: a transformers causal LM,
    or a name ``opsdl train`` accepts (``smollm2-135m``, a folder, ``tiny:<family>``, a hub id).
    Datasets: ``prompt`` / ``teacher_prompt`` columns (strings, or conversations ending in a user
    turn), or ``long_context`` / ``short_context`` / ``question`` (put into one user turn
    "{context}\\n\\n{question}" as ``opsdl train`` does). Other arguments as ``SDFTTrainer``."""

    _tag_names = ["trl", "opsdl"]
    _name = "OPSDL"
    config_cls = OPSDLConfig
    _paper = {"title": "OPSDL: On-Policy Self-Distillation for Long-Context Language Models", "id": "", "citation": ""}

    def __init__(
        self,
        model: Union[str, PreTrainedModel, nn.Module],
        args: Optional[OPSDLConfig] = None,
        train_dataset: Optional[Dataset] = None,
        eval_dataset: Union[Dataset, dict[str, Dataset], None] = None,
        processing_class: Optional[PreTrainedTokenizerBase] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        optimizers: tuple = (None, None),
        peft_config: Any = None,
    ):
        if not isinstance(args, OPSDLConfig):
            raise TypeError(f"args: expected an OPSDLConfig, got {type(args).__name__}")
        check_columns(train_dataset, "train_dataset")
        check_columns(eval_dataset, "eval_dataset")
        if isinstance(model, str):
            dtype = (args.model_init_kwargs or {}).get("dtype", torch.float32)
            model, tokenizer = load_model(model, dtype=dtype, trust_remote_code=args.trust_remote_code)
            processing_class = processing_class or tokenizer
        with colocated_engine_start(model, processing_class, args):
            super().__init__(model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                             peft_config=peft_config)
        if self.use_vllm:
            reload_weights_on_cpu(self.vllm_generation)
        self.prompt_limit, self.max_prompt_length = args.max_prompt_length, None  # refuse, never cut (below)
        refuse_sharded_weights(self, "OPSDLTrainer", allow_fsdp2=True)
        output_head(self.model)  # refuses an lm-head that PEFT adapted, before any step

    # ---- teacher: SDFT's, except a frozen or EMA teacher of a plain model is a copy of the
    # student's initial weights (SDFT reloads them from the model's hub id, which a model built
    # in memory or loaded from GGUF does not have) ----------------------------------------------
    def _setup_teacher_model(self) -> None:
        kind = self.args.teacher_model_kind
        if kind == "live" or is_peft_model(self.model):
            return super()._setup_teacher_model()
        teacher = copy.deepcopy(causal_lm(self.model)).requires_grad_(False).eval()
        # accelerate's mixed precision leaves an instance-level `forward` bound to the prepared model:
        # a copy would keep calling the student. The copy uses its class's own forward.
        teacher.__dict__.pop("forward", None)
        if self.accelerator.num_processes > 1:  # DDP gives every rank rank 0's student; the teacher too
            for tensor in [*teacher.parameters(), *teacher.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
        # under FSDP2 the copy is sharded like the student (an EMA update adds shards to shards)
        self.teacher_model = prepare_fsdp(teacher, self.accelerator) if self.is_fsdp_enabled \
            else self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if kind == "ema":
            self.add_callback(SyncTeacherModelCallback(teacher_model=self.teacher_model, accelerator=self.accelerator))

    # ---- prompts -----------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*PROMPT_COLUMNS, *PREPARED_COLUMNS]

    def _as_prompt(self, context: str, question: str) -> Union[str, list[dict]]:
        """``opsdl train``'s prompt: one user turn "{context}\\n\\n{question}" (plain text without a chat template)."""
        if self._tokenizer.chat_template:
            return [{"role": "user", "content": f"{context}\n\n{question}"}]
        return PLAIN_TEMPLATE.format(context=context, question=question)

    def _with_prompts(self, example: dict) -> dict:
        if all(example.get(c) is not None for c in PROMPT_COLUMNS):
            return example
        return {**example, "prompt": self._as_prompt(example["long_context"], example["question"]),
                "teacher_prompt": self._as_prompt(example["short_context"], example["question"])}

    def _tokenize_prompts(self, prompts: list[Any]) -> list[list[int]]:
        ids = super()._tokenize_prompts(prompts)  # self.max_prompt_length is None: nothing is cut
        longest = max(len(p) for p in ids)
        if self.prompt_limit is not None and longest > self.prompt_limit:
            raise ValueError(f"max_prompt_length: a prompt has {longest} tokens, more than max_prompt_length="
                             f"{self.prompt_limit}; OPSDL does not cut a long context: raise max_prompt_length or "
                             "shorten the example")
        return ids

    def _prepare_training_batch(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """The student's rollouts under ``prompt``, and the teacher's input [``teacher_prompt`` ; rollout]."""
        inputs = [self._with_prompts(example) for example in inputs]
        batch = self.sample_rollouts(inputs)
        self._record_completion_metrics("train" if self.model.training else "eval", batch)
        device = batch["completion_ids"].device
        teacher_ids = [torch.tensor(ids) for ids in self._tokenize_prompts([e["teacher_prompt"] for e in inputs])]
        teacher_mask = [torch.ones_like(ids) for ids in teacher_ids]
        teacher_ids = pad(teacher_ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        teacher_mask = pad(teacher_mask, padding_value=0, padding_side="left").to(device)
        batch["teacher_input_ids"] = torch.cat([teacher_ids, batch["completion_ids"]], dim=1)
        batch["teacher_attention_mask"] = torch.cat([teacher_mask, batch["completion_mask"]], dim=1)
        self._dispatch_self_distillation_callback(
            "on_self_distillation_batch_prepared", old_per_token_logps=batch.get("old_per_token_logps"),
            prompt_ids=batch["prompt_ids"], completion_ids=batch["completion_ids"],
            teacher_input_ids=batch["teacher_input_ids"], teacher_attention_mask=batch["teacher_attention_mask"])
        return batch

    # ---- the loss's denominator: the answer tokens of the optimizer step ------------------------
    def _prepare_inputs(self, generation_batch):
        buffered = self._buffered_inputs
        batch = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not buffered:
            self._count_step_rows(self._buffered_inputs)
        return batch

    def _count_step_rows(self, slices: list[dict]) -> None:
        """Each micro-batch learns how many answer tokens its optimizer step holds, so that the
        step's loss is their mean whatever micro-batch (and rank) holds them. When one generation covers
        whole optimizer steps (``steps_per_generation`` a multiple of the accumulation steps; the
        default) this is exact; otherwise a micro-batch's mean is divided by the accumulation steps."""
        accumulation = self.args.gradient_accumulation_steps
        local = torch.stack([self._loss_mask(s).sum() for s in slices]).float()
        # every rank's counts (all ranks regenerate together): DDP averages the ranks' gradients, so
        # each rank divides by the step's count over all ranks / the number of ranks
        ranks = self.accelerator.num_processes
        counts = (self.accelerator.gather(local).reshape(ranks, -1).sum(0) / ranks).tolist()
        for index, part in enumerate(slices):
            if len(slices) % accumulation == 0:
                first = index - index % accumulation
                part["step_rows"] = sum(counts[first:first + accumulation])
            else:
                part["step_rows"] = counts[index] * accumulation

    def _loss_mask(self, inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"].bool()
        if self.num_loss_tokens_to_skip > 0:
            positions = torch.arange(mask.shape[1], device=mask.device)
            mask = mask & (positions >= self.num_loss_tokens_to_skip)
        return mask

    # ---- hidden states and the fused loss --------------------------------------------------------
    def _student_hidden(self, model, inputs: dict) -> torch.Tensor:
        completion = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return completion_hidden(model, input_ids, attention_mask, completion.shape[1])

    def _token_logprobs(self, model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = whole_head(output_head(model), trained=False)  # no gradient: read as a constant
        weight = head.weight.detach().to(hidden.dtype)
        bias = None if head.bias is None else head.bias.detach().to(hidden.dtype)
        return fused_token_logprobs(hidden.detach(), weight, targets, bias=bias, temperature=self.temperature,
                                    softcap=head.softcap, impl=self.args.fused_impl)

    def _compute_rollout_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
        """log p(y) of the rollouts at generation time, when they serve more than one optimizer step
        (for ``distillation_is_clip``): from the hidden states, no logits."""
        if self.args.gradient_accumulation_steps % (self.args.steps_per_generation * self.num_iterations) == 0:
            return None
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                  "completion_mask": completion_mask}
        with torch.no_grad():
            return self._token_logprobs(self.model, self._student_hidden(self.model, inputs), completion_ids)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs: OPSDLTrainer computes no logits (the fused loss reads hidden states), "
                             "so it has no outputs to return")
        completion = inputs["completion_ids"]
        mask = self._loss_mask(inputs)
        student_hidden = self._student_hidden(model, inputs)
        with torch.no_grad(), self._get_teacher_context_for_self_distillation():
            teacher_hidden = completion_hidden(self.teacher_model, inputs["teacher_input_ids"],
                                               inputs["teacher_attention_mask"], completion.shape[1])
        head = whole_head(output_head(model), trained=True)
        teacher_head = whole_head(output_head(self.teacher_model), trained=False)
        dtype = student_hidden.dtype
        weight = head.weight.to(dtype)  # autograd-tracked when it casts: the gradient reaches the weight
        bias = None if head.bias is None else head.bias.to(dtype)
        shared = teacher_head.weight is head.weight  # live teacher, or the base model under PEFT
        teacher_weight = None if shared else teacher_head.weight.detach().to(dtype)
        teacher_bias = None if teacher_head.bias is None or shared else teacher_head.bias.detach().to(dtype)

        token_weights = None
        old = inputs.get("old_per_token_logps")
        if self.args.distillation_is_clip is not None and old is not None:
            now = self._token_logprobs(model, student_hidden, completion)
            token_weights = torch.exp((now - old).clamp(-20.0, 20.0)).clamp(max=self.args.distillation_is_clip)

        loss_sum, log_ratio = fused_rkl_loss(
            student_hidden, teacher_hidden.to(dtype), weight, teacher_weight, targets=completion,
            estimator=self.args.estimator, mask=mask, token_weights=token_weights, temperature=self.temperature,
            softcap=head.softcap, bias=bias, teacher_bias=teacher_bias, reduction="sum", impl=self.args.fused_impl,
            return_log_ratio=True)

        rows = max(float(mask.sum()), 1.0)
        step_rows = inputs.get("step_rows") if model.training else None
        loss = loss_sum / max(step_rows, 1.0) if step_rows is not None else loss_sum / rows
        mode = "train" if model.training else "eval"
        self._log_self_distillation_metric(mode, self.accelerator.gather(loss_sum.detach() / rows).mean().item())
        self._metrics[mode]["opsdl/log_ratio"].append(
            self.accelerator.gather(log_ratio.sum() / rows).mean().item())
        return loss
