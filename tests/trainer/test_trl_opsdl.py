"""OPSDLTrainer (TRL): its step-1 loss and gradients equal `opsdl train`'s objective on the same
prompts and greedy rollouts; it trains, checkpoints and resumes as TRL does; PEFT's frozen teacher
is the base model with adapters disabled; bad input is refused in one line."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer  # noqa: E402
from opsdl.model import lm_head, load_model  # noqa: E402
from opsdl.objective import distillation_loss, packed_rows  # noqa: E402
from opsdl.options import TrainConfig  # noqa: E402
from opsdl.rollout import prompt_ids, sample  # noqa: E402
from tests.trainer.trl_replay import ROWS, config  # noqa: E402

WORKER = Path(__file__).with_name("trl_peft_memory_worker.py")
README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLES = ROWS[:2]


def trl_step_one(trainer: OPSDLTrainer) -> tuple[torch.Tensor, list[list[int]], dict[str, torch.Tensor]]:
    """The trainer's own batch (rollouts, teacher input) and loss on EXAMPLES, and the gradients."""
    trainer.model.train()
    batch = trainer._prepare_training_batch(list(EXAMPLES))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    responses = [ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), responses, grads, prompts


def opsdl_step_one(model, tokenizer, estimator: str, teacher: str, responses=None):
    """`opsdl train`'s objective (packed rows, `distillation_loss`) on EXAMPLES with greedy rollouts."""
    students = [prompt_ids(tokenizer, e["long_context"], e["question"]) for e in EXAMPLES]
    teachers = [prompt_ids(tokenizer, e["short_context"], e["question"]) for e in EXAMPLES]
    if responses is None:
        responses = [r.tokens for r in sample(model, tokenizer, students, temperature=0, max_new_tokens=8)]
    teacher_model = model if teacher == "live" else copy.deepcopy(model).requires_grad_(False)
    cfg = TrainConfig(estimator=estimator, temperature=0.0, impl="torch")
    with torch.no_grad():
        teacher_rows = packed_rows(teacher_model, teachers, responses, "cpu")
    student_rows = packed_rows(model, students, responses, "cpu")
    targets = torch.tensor([t for r in responses for t in r])
    loss_sum, _ = distillation_loss(cfg, lm_head(model), lm_head(teacher_model), student_rows, teacher_rows, targets,
                                    reduction="sum")
    loss = loss_sum / len(targets)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), responses, grads, students


def assert_same_step(trl_result, opsdl_result):
    """Padded batches (TRL) against packed rows (opsdl) in float32 sum in different orders. The exact
    KL is a small difference of log-probabilities near log V ~ 10.8: measured |loss difference| at
    most 6e-8 on an AMD EPYC and 1.13e-6 on a Xeon with AMX (SmolLM2-135M); gradients, per tensor,
    ||g - g_ref|| / ||g_ref|| at most 1.2e-6 (tiny) and 2.2e-5 (SmolLM2, 30 layers, EPYC). Bounds:
    1e-5 absolute on the loss (8.8x over the larger),
    2e-4 on each tensor's relative gradient error (9x); a wrong row, teacher or temperature moves
    both by more than 1e-3."""
    loss, responses, grads, prompts = trl_result
    ref_loss, ref_responses, ref_grads, ref_prompts = opsdl_result
    assert prompts == ref_prompts  # the same prompt tokens as `opsdl train`
    assert responses == ref_responses
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-5), (loss.item(), ref_loss.item(), (loss - ref_loss).item())
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).norm() <= 2e-4 * ref.norm(), name


@pytest.mark.parametrize("estimator,teacher", [("full", "base"), ("sampled", "live"), ("full", "ema")])
def test_step_one_equals_opsdl_train_tiny(tmp_path, estimator, teacher):
    model, tokenizer = load_model("tiny:llama", seed=0)
    reference = copy.deepcopy(model)
    trainer = OPSDLTrainer(model, args=config(tmp_path, estimator=estimator, teacher_model_kind=teacher),
                           train_dataset=Dataset.from_list(EXAMPLES), processing_class=tokenizer)
    # at step 1 an EMA teacher is the initial weights, as a frozen one
    assert_same_step(trl_step_one(trainer),
                     opsdl_step_one(reference, tokenizer, estimator, "live" if teacher == "live" else "base"))


def test_step_one_equals_opsdl_train_smollm2(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    reference = copy.deepcopy(model)
    trainer = OPSDLTrainer(model, args=config(tmp_path), train_dataset=Dataset.from_list(EXAMPLES),
                           processing_class=tokenizer)
    assert_same_step(trl_step_one(trainer), opsdl_step_one(reference, tokenizer, "full", "base"))


def test_prompt_and_teacher_prompt_columns_train_and_checkpoint(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"{e['long_context']}\n\n{e['question']}"}],
             "teacher_prompt": [{"role": "user", "content": f"{e['short_context']}\n\n{e['question']}"}]}
            for e in EXAMPLES] * 2
    trainer = OPSDLTrainer("tiny:llama", args=config(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                                                     generation_kwargs=None, temperature=0.7),
                           train_dataset=Dataset.from_list(rows))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
    assert "opsdl/log_ratio" in trainer.state.log_history[0]


def saving(path: Path, steps: int) -> OPSDLConfig:
    """``steps`` steps, a checkpoint at the last."""
    return config(path, max_steps=steps, save_strategy="steps", save_steps=steps)


def test_resume_continues_as_an_uninterrupted_run(tmp_path):
    """3 steps in one go, and 2 steps then a resumed 3rd from checkpoint-2: the same weights."""
    data = Dataset.from_list(EXAMPLES * 3)
    whole = OPSDLTrainer("tiny:llama", args=saving(tmp_path / "whole", 3), train_dataset=data)
    whole.train()
    first = OPSDLTrainer("tiny:llama", args=saving(tmp_path / "cut", 2), train_dataset=data)
    first.train()
    resumed = OPSDLTrainer("tiny:llama", args=saving(tmp_path / "cut", 3), train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name  # same arithmetic: only reload rounding


def lora(model):
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, init_lora_weights=False))
    return peft_model


def test_peft_frozen_teacher_is_the_base_model_with_adapters_disabled(tmp_path):
    """The teacher is the student module itself, and its step-1 loss is the loss with a frozen
    full copy of the base weights as teacher (the adapters start non-zero: the two differ)."""
    model, tokenizer = load_model("tiny:llama", seed=0)
    base_copy = copy.deepcopy(model).requires_grad_(False)
    trainer = OPSDLTrainer(lora(model), args=config(tmp_path), train_dataset=Dataset.from_list(EXAMPLES),
                           processing_class=tokenizer)
    assert trainer.teacher_model is trainer.model
    trainer.model.train()
    batch = trainer._prepare_training_batch(list(EXAMPLES))
    loss = trainer.compute_loss(trainer.model, batch)
    completion = batch["completion_ids"]
    with torch.no_grad():
        student = trainer._student_hidden(trainer.model, batch)
        from opsdl.integrations.trl.hidden import completion_hidden
        from opsdl_kernels import fused_rkl_loss
        teacher = completion_hidden(base_copy, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                    completion.shape[1])
        mask = batch["completion_mask"].bool()
        expected = fused_rkl_loss(student, teacher, lm_head(base_copy).weight, targets=completion, mask=mask,
                                  impl="torch", reduction="sum") / mask.sum()
        live = fused_rkl_loss(student, trainer._student_hidden(trainer.model, {
            **batch, "prompt_ids": batch["teacher_input_ids"][:, :-completion.shape[1]],
            "prompt_mask": batch["teacher_attention_mask"][:, :-completion.shape[1]]}),
            lm_head(base_copy).weight, targets=completion, mask=mask, impl="torch", reduction="sum") / mask.sum()
    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7), (loss, expected)
    assert not torch.allclose(expected, live, rtol=1e-3)  # the adapters matter: a live teacher would differ


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc (Linux)")
def test_peft_teacher_holds_no_second_copy_of_the_weights():
    """Peak memory of a process that builds the trainer on SmolLM2-135M and runs one LoRA step:
    the base-model teacher (adapters disabled) against a frozen full copy of the base weights; the
    copy costs the model's 513 MiB of float32 weights, the adapter switch nothing (measured: peaks
    1329 MiB and 1756 MiB, 427 MiB apart). The bound: half the weights (1.7x margin; the peak
    also holds the GGUF load's transient, which both processes share)."""
    peaks = {}
    for mode in ("peft", "copy"):
        out = subprocess.run([sys.executable, str(WORKER), mode], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    weights_mib = peaks["copy"]["weights_mib"]
    assert peaks["copy"]["peak_mib"] - peaks["peft"]["peak_mib"] > 0.5 * weights_mib, peaks


def test_refusals(tmp_path):
    data = Dataset.from_list(EXAMPLES)
    with pytest.raises(TypeError, match="args: expected an OPSDLConfig"):
        OPSDLTrainer("tiny:llama", args=None, train_dataset=data)
    with pytest.raises(ValueError, match=r"train_dataset: expected the columns \['prompt', 'teacher_prompt'\]"):
        OPSDLTrainer("tiny:llama", args=config(tmp_path), train_dataset=Dataset.from_list([{"prompt": "x"}]))
    with pytest.raises(ValueError, match="estimator: expected one of"):
        config(tmp_path, estimator="topk")
    with pytest.raises(ValueError, match="fused_impl: expected 'auto', 'triton' or 'torch', got 'cuda'"):
        config(tmp_path, fused_impl="cuda")
    with pytest.raises(ValueError, match="teacher_model_kind: expected one of"):
        config(tmp_path, teacher_model_kind="frozen")
    with pytest.raises(ValueError, match="distillation_mode: OPSDLConfig does not use it"):
        config(tmp_path, distillation_mode="full_logits")
    with pytest.raises(ValueError, match="teacher_prompt_template: OPSDLConfig does not use it"):
        config(tmp_path, teacher_prompt_template="{prompt} {privileged_context} extra")
    model, tokenizer = load_model("tiny:llama", seed=0)
    head_lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="peft_config: its target_modules include the lm-head"):
        OPSDLTrainer(head_lora, args=config(tmp_path), train_dataset=data, processing_class=tokenizer)
    short = OPSDLTrainer("tiny:llama", args=config(tmp_path, max_prompt_length=32), train_dataset=data)
    with pytest.raises(ValueError, match="max_prompt_length: a prompt has .* tokens, more than max_prompt_length=32"):
        short._prepare_training_batch(list(EXAMPLES))


def test_readme_example_runs_as_printed(tmp_path):
    section = README.read_text().split("## OPSDL in TRL", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs" / "trl-opsdl" / "checkpoint-2" / "model.safetensors").is_file()


def test_bf16_default_follows_the_cpu(tmp_path, monkeypatch):
    import opsdl.integrations.trl.config as trl_config
    for units, expected in (([], False), (["avx512_bf16"], True)):
        monkeypatch.setattr(trl_config, "cpu_bf16_units", lambda units=units: units)
        assert OPSDLConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]).bf16 is expected
    assert OPSDLConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False).bf16 is False


def test_step_rows_count_every_rank(tmp_path, monkeypatch):
    """The loss divides by the optimizer step's answer tokens over all ranks / the number of ranks
    (DDP averages the ranks' gradients: the result is the token mean over all of them). A second rank
    is imitated: its counts are 3x this one's."""
    trainer = OPSDLTrainer("tiny:llama", args=config(tmp_path, gradient_accumulation_steps=2),
                           train_dataset=Dataset.from_list(EXAMPLES))
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, 3 * t]))
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])]  # 3 and 5 tokens
    slices = [{"completion_mask": m} for m in masks]
    trainer._count_step_rows(slices)
    assert [s["step_rows"] for s in slices] == [(3 + 5) * (1 + 3) / 2] * 2
