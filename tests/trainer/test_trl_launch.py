"""OPSDLTrainer (TRL) beyond one plain process: DDP under torchrun and DeepSpeed ZeRO-1/2 under
accelerate launch (two CPU ranks, gloo) against one process; PEFT with an EMA teacher (TRL's second
"teacher" adapter, no second copy of the base weights); PEFT with the live teacher (the student
with its adapters on)."""
from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl.experimental.sdft.teacher_sync import PEFTAdapterEMACallback, SyncTeacherModelCallback  # noqa: E402

from opsdl.integrations.trl import OPSDLTrainer  # noqa: E402
from opsdl.integrations.trl.hidden import causal_lm, completion_hidden  # noqa: E402
from opsdl.model import lm_head, load_model  # noqa: E402
from opsdl.rollout import prompt_ids  # noqa: E402
from opsdl_kernels import fused_rkl_loss  # noqa: E402
from tests.trainer.trl_replay import (ROWS, check_first_step, config, free_port, launch, load,  # noqa: E402
                                      reference_trainer, relative_errors, replay_step)

EXAMPLES = ROWS[:2]
LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def check_ranks(ranks: list[dict], tensors: dict, distributed_type: str, wrapper: str) -> None:
    """Two gloo ranks of ``distributed_type``, compute_loss given the ``wrapper`` module, two steps
    on the four rows split between the ranks; TRL logs the mean of the ranks' losses; the ranks hold
    the same weights (and gradients) throughout, and step 2 moved them."""
    for rank, result in enumerate(ranks):
        assert (result["rank"], result["world_size"], result["backend"]) == (rank, 2, "gloo")
        assert distributed_type in result["distributed_type"]
        assert [c["model"] for c in result["losses"]] == [wrapper] * 2
        assert len(result["batches"]) == 2
        assert all(math.isfinite(c["loss"]) and c["loss"] > 0 for c in result["losses"])
    seen = [q for result in ranks for q in result["batches"][0]["questions"]]
    assert sorted(seen) == sorted(row["question"] for row in ROWS)
    logged = [h["loss"] for h in ranks[0]["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)
    assert logged[0] == pytest.approx((ranks[0]["losses"][0]["loss"] + ranks[1]["losses"][0]["loss"]) / 2, rel=1e-5)
    assert logged == [h["loss"] for h in ranks[1]["log_history"] if "loss" in h]
    for what, (a, b) in tensors.items():
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what
    step1, step2 = tensors["step1"][0], tensors["step2"][0]
    assert any(not torch.equal(step2[k], step1[k]) for k in step1)


# ---- 1. DDP under torchrun ------------------------------------------------------------------------
def test_ddp_two_ranks_average_gradients_as_one_process_with_both_batches(tmp_path):
    """Two ranks, a batch of 2 each, 2 steps. Each rank's loss is the token mean of its own batch
    and DDP averages the gradients over the ranks, so one process's equivalent of a DDP step is
    the mean of the two per-batch gradients (not the token mean of the 4 rows together, which
    weighs rows by their answer lengths; the same here, where every greedy answer runs the full 8
    tokens, but not in general). The comparison is of gradients, not of the weights after one
    AdamW step: that step is ~lr * sign(g) and would not see, e.g., gradients summed over ranks
    rather than averaged (hence also no clipping: max_grad_norm=0, clipping rescales any error away).

    What each rank trained on is what the worker recorded (TRL's RepeatSampler and accelerate's
    dataloader shard the batches), not assumed; the reference replays those batches in-process,
    from the weights DDP started from, with the trainer's own `_prepare_training_batch` and
    `compute_loss`. Measured: the DDP gradients equal the mean of the two in-process gradients
    bit for bit (each rank does the reference's arithmetic on its batch, and the all-reduced mean
    of two float32 numbers is their mean), as do the weights after step 1 against the reference's
    own optimizer (TRL's AdamW defaults) stepped with that mean. Bounds, for float32 rounding on
    another machine or build: per tensor ||g_ddp - g_ref|| / ||g_ref|| < 1e-4 (one rank's gradient
    alone is ~0.8 from the mean); weights within 1e-3 * lr (elements whose gradient is within
    ~eps=1e-8 of 0 amplify any gradient rounding; the steps themselves are ~lr = 5e-5)."""
    launch(["torch.distributed.run", "--standalone", "--nproc-per-node", "2"], tmp_path, ["base"],
           {"max_grad_norm": 0.0})
    ranks, tensors = load(tmp_path, "base")
    check_ranks(ranks, tensors, "MULTI_CPU", "DistributedDataParallel")

    initial = tensors["initial"][0]
    reference = reference_trainer(tmp_path / "one", initial)
    mean = replay_step(reference, ranks, 1)
    ddp_grads = tensors["grads1"][0]
    assert ddp_grads.keys() == mean.keys()
    errors = relative_errors(ddp_grads, mean)
    assert max(errors.values()) < 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:3]

    check_first_step(reference, mean, initial, tensors["step1"][0])


# ---- 2. DeepSpeed ZeRO-1 and ZeRO-2 under accelerate launch -----------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed "
                    "(pip install \"opsdl[deepspeed]\")")
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_steps_with_the_mean_of_the_ranks_gradients(tmp_path, stage):
    """``accelerate launch --use_deepspeed --zero_stage 1|2`` on two CPU ranks (DeepSpeed's CPU
    accelerator, gloo). DeepSpeed takes the optimizer step inside the backward and keeps the reduced
    gradients in its own partitions, so the step itself is read: with plain SGD at lr 1 (no
    momentum, no decay, no clipping), the initial weights minus step 1's are the gradient it
    applied, which must be the mean of the ranks' per-batch gradients replayed in one process.
    The step rounds each weight once (to ~1 ulp of the weight: on the layer norms, weights ~1 with
    small gradients, that is up to 2.6e-3 of the gradient), so the bound per tensor is
    ||eps * max(|w0|, |w1|)|| + 1e-4 ||g||: measured at most 0.24 of it; every gradient's norm is at
    least 91 times it, so half or twice the mean (a sum over the ranks) fails."""
    launch(["accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage), "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())], tmp_path, ["base"],
           {"max_grad_norm": 0.0, "optim": "sgd", "learning_rate": 1.0, "weight_decay": 0.0},
           env={"DS_ACCELERATOR": "cpu"})
    ranks, tensors = load(tmp_path, "base")
    check_ranks(ranks, tensors, "DEEPSPEED", "DeepSpeedEngine")
    assert [r["zero_stage"] for r in ranks] == [stage, stage]
    assert "grads1" not in tensors  # DeepSpeed's gradients live in its partitions, not in .grad

    initial, after = tensors["initial"][0], tensors["step1"][0]
    mean = replay_step(reference_trainer(tmp_path / "one", initial), ranks, 1)
    assert mean.keys() == initial.keys()
    for name, grad in mean.items():
        applied = initial[name] - after[name]  # SGD at lr 1: the gradient, rounded once into the weights
        rounding = torch.finfo(torch.float32).eps * torch.maximum(initial[name].abs(), after[name].abs())
        bound = float(rounding.norm()) + 1e-4 * float(grad.norm())
        error = float((applied - grad).norm())
        assert error <= bound, (name, error, bound)
        assert float(grad.norm()) > 10 * bound, name  # half or twice the mean (a sum over ranks) fails it


# ---- 3. PEFT with an EMA teacher -------------------------------------------------------------------
def adapter(model, name: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


class AdapterRecorder(TrainerCallback):
    """The student's adapter at the start and after each step (before TRL's EMA callback, which
    comes after the trainer's own callbacks), and the teacher adapter at the start of each step."""

    def __init__(self):
        self.student, self.teacher = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.student.append(adapter(model))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.teacher.append(adapter(model, "teacher"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.student.append(adapter(model))


def capture_losses(trainer) -> list:
    calls, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        calls.append(({k: v for k, v in inputs.items()}, loss.detach().clone()))
        return loss

    trainer.compute_loss = spy
    return calls


def hand_rkl(student_hidden, teacher_model, head_weight, batch) -> torch.Tensor:
    """The exact reverse-KL token mean with the teacher's hidden states from ``teacher_model``."""
    completion = batch["completion_ids"]
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        teacher = completion_hidden(teacher_model, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                    completion.shape[1])
        return fused_rkl_loss(student_hidden, teacher, head_weight, targets=completion, mask=mask, impl="torch",
                              reduction="sum") / mask.sum()


def test_peft_ema_teacher_is_a_second_adapter_moved_by_ema(tmp_path):
    """TRL's PEFTAdapterEMACallback adds an adapter "teacher" at on_train_begin with ZERO weights
    (not the student's: at step 1 the EMA teacher is the base model) and after every step sets
    teacher <- (1 - rate) * teacher + rate * student, per tensor (lora_A and lora_B separately).
    With rate 0.5: after step 1, 0.5 * S1 (the midpoint of its start, 0, and the student);
    after step 2, 0.25 * S1 + 0.5 * S2. The adapters start non-zero (init_lora_weights=False), so
    that the zero teacher, the student's adapter and the base differ from step 1 on.
    The EMA weights: measured bit-equal to the formula (bound 1e-7). Losses in float32, the same
    arithmetic up to summation order: measured |difference| <= 1.2e-7 on losses of ~1e-2, bound
    2e-6; the wrong teachers (the student's adapter, the base) differ by >= 1.1e-3, checked > 5e-4."""
    model, tokenizer = load_model("tiny:llama", seed=0)
    base_copy = copy.deepcopy(model).requires_grad_(False)
    recorder = AdapterRecorder()
    trainer = OPSDLTrainer(model, args=config(tmp_path, max_steps=2, teacher_model_kind="ema", teacher_update_rate=0.5,
                                              learning_rate=1e-3),
                           train_dataset=Dataset.from_list(EXAMPLES * 2), processing_class=tokenizer,
                           peft_config=LoraConfig(**LORA, init_lora_weights=False), callbacks=[recorder])
    # no second copy of the base weights: the teacher is the student module, switched to an adapter
    assert trainer.teacher_model is trainer.model
    assert causal_lm(trainer.teacher_model) is causal_lm(trainer.model)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert PEFTAdapterEMACallback in kinds and SyncTeacherModelCallback not in kinds
    base_numel = sum(p.numel() for p in base_copy.parameters())
    assert sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n) == base_numel
    calls = capture_losses(trainer)
    trainer.train()
    assert set(trainer.model.peft_config) == {"default", "teacher"}
    model = trainer.model

    # the EMA, exactly as TRL's callback defines it
    s0, s1, s2 = recorder.student
    t_step1, t_step2 = recorder.teacher
    t_end = adapter(model, "teacher")
    assert s0.keys() == t_end.keys()
    assert all(not torch.equal(s1[k], s0[k]) and not torch.equal(s2[k], s1[k]) for k in s0)  # the student trains
    assert all(torch.count_nonzero(t_step1[k]) == 0 for k in t_step1)  # starts at zero (= the base model)
    for k in s0:
        assert torch.allclose(t_step2[k], 0.5 * s1[k], rtol=0, atol=1e-7), k
        assert torch.allclose(t_end[k], 0.5 * (0.5 * s1[k]) + 0.5 * s2[k], rtol=0, atol=1e-7), k
        assert not torch.allclose(t_end[k], s2[k], rtol=0, atol=1e-4)
    # only the student's adapter trains; the teacher's stays frozen after every switch
    for name, param in model.named_parameters():
        assert param.requires_grad == (".default." in name), name

    # step 1 was scored with the teacher adapter (then zero: the base model), not the student's adapter
    head = lm_head(base_copy).weight
    batch, loss = calls[0]
    student_at_s0 = copy.deepcopy(model)  # the student of step 1: its adapter at S0
    set_peft_model_state_dict(student_at_s0, s0, adapter_name="default")
    with torch.no_grad():
        student_hidden = trainer._student_hidden(student_at_s0, batch)
    with_base = hand_rkl(student_hidden, base_copy, head, batch)
    with_student = hand_rkl(student_hidden, student_at_s0, head, batch)
    assert abs(float(loss) - float(with_base)) < 2e-6, (loss, with_base)
    assert abs(float(with_student) - float(with_base)) > 5e-4

    # after training, on a fixed batch: the loss reads the teacher adapter (0.25 S1 + 0.5 S2), not
    # the student's (S2), nor the base model; the teacher here is an independent copy of the base
    # carrying the teacher adapter's weights as its only adapter
    model.train()
    fixed = trainer._prepare_training_batch(list(EXAMPLES))
    loss = trainer.compute_loss(model, fixed).detach()
    with torch.no_grad():
        student_hidden = trainer._student_hidden(model, fixed)
    ema_teacher = get_peft_model(copy.deepcopy(base_copy), LoraConfig(**LORA, init_lora_weights=False))
    set_peft_model_state_dict(ema_teacher, t_end)
    expected = hand_rkl(student_hidden, ema_teacher, head, fixed)
    assert abs(float(loss) - float(expected)) < 2e-6, (loss, expected)
    with model.disable_adapter():
        assert abs(float(hand_rkl(student_hidden, model, head, fixed)) - float(expected)) > 5e-4
    assert abs(float(hand_rkl(student_hidden, model, head, fixed)) - float(expected)) > 5e-4  # student's adapter


# ---- 4. PEFT with the live teacher --------------------------------------------------------------------
def test_peft_live_teacher_sampled_loss_is_the_log_ratio_of_two_forwards(tmp_path):
    """The live teacher is the student with its adapters on: the step-1 loss of the sampled
    estimator is mean over answer tokens of log p(y | long prompt) - log p(y | short prompt), both
    from the same PEFT model (its full logits, one unpadded row at a time, prompts tokenized here).
    Measured: |difference| 2.4e-7 on a value of 0.165 (padding and the fused path only reorder
    float32 sums); bound 2e-6. Without the adapters the value moves by 0.1 (checked > 5e-4)."""
    model, tokenizer = load_model("tiny:llama", seed=0)
    trainer = OPSDLTrainer(model, args=config(tmp_path, estimator="sampled", teacher_model_kind="live"),
                           train_dataset=Dataset.from_list(EXAMPLES), processing_class=tokenizer,
                           peft_config=LoraConfig(**LORA, init_lora_weights=False))
    assert trainer.teacher_model is trainer.model
    before = copy.deepcopy(trainer.model).eval()  # the weights of step 1
    calls = capture_losses(trainer)
    trainer.train()
    assert trainer.state.global_step == 1 and len(calls) == 1
    batch, loss = calls[0]

    def answer_logprobs(peft_model, prompt: list[int], answer: list[int]) -> torch.Tensor:
        logits = peft_model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
        logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
        return logps.gather(-1, torch.tensor(answer)[:, None])[:, 0]

    def log_ratio(peft_model) -> torch.Tensor:
        ratios = []
        with torch.no_grad():
            for example, ids, mask in zip(EXAMPLES, batch["completion_ids"], batch["completion_mask"]):
                answer = ids[mask.bool()].tolist()
                long = prompt_ids(tokenizer, example["long_context"], example["question"])
                short = prompt_ids(tokenizer, example["short_context"], example["question"])
                ratios.append(answer_logprobs(peft_model, long, answer) - answer_logprobs(peft_model, short, answer))
        return torch.cat(ratios).mean()

    expected = log_ratio(before)
    assert abs(float(loss) - float(expected)) < 2e-6, (loss, expected)
    with before.disable_adapter():
        assert abs(float(log_ratio(before)) - float(expected)) > 5e-4
