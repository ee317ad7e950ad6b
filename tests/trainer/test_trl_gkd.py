"""FusedGKDTrainer (TRL's GKD with the fused loss): its loss and student gradients equal TRL's
GKDTrainer.compute_loss (beta 0 and 1, padding, prompt rows masked, with and without
num_items_in_batch), both checked against TRL's own loss in float64; a mixture beta is refused;
it trains on-policy through trainer.train() and writes a checkpoint."""
from __future__ import annotations

import math
import os
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from opsdl.integrations.trl.gkd import FusedGKDTrainer  # noqa: E402
from opsdl.model import load_tokenizer, tiny_config  # noqa: E402

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("llama", **overrides))


def gkd_config(tmp_path: Path, beta: float, **overrides) -> GKDConfig:
    settings = dict(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False, seed=0)
    return GKDConfig(**{**settings, **overrides})


def dataset() -> Dataset:
    return Dataset.from_list([{"messages": m} for m in MESSAGES])


def batch() -> dict[str, torch.Tensor]:
    """Three rows of 16 tokens, left-padded as TRL's ChatML collator pads (4 and 2 pad tokens), the
    prompt and the padding labelled -100, so the shifted mask counts 7 + 6 + 9 rows."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 512, (3, 16), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    attention_mask[1, :2] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    for row, prompt_end in enumerate((9, 10, 7)):  # prompt tokens: up to this column
        labels[row, :prompt_end] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in float64. Not copy.deepcopy: once a Trainer holds the model, its instance
    carries a ``forward`` bound to the original, which a deep copy would keep calling."""
    copy_ = AutoModelForCausalLM.from_config(model.config)
    copy_.load_state_dict(model.state_dict())
    return copy_.double()


def loss_and_grads(compute, model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def trainers(tokenizer, tmp_path_factory):
    """The fused and TRL's trainers on one student and one teacher (float32; init range 0.2, so
    that the two models' next-token distributions are peaked and far apart: a KL of order 1)."""
    student, teacher = tiny_llama(0, initializer_range=0.2), tiny_llama(1, initializer_range=0.2)
    out = tmp_path_factory.mktemp("gkd")
    fused = FusedGKDTrainer(model=student, teacher_model=teacher, args=gkd_config(out, 1.0), train_dataset=dataset(),
                            processing_class=tokenizer)
    ours = GKDTrainer(model=student, teacher_model=teacher, args=gkd_config(out, 1.0), train_dataset=dataset(),
                      processing_class=tokenizer)
    return fused, ours


@pytest.mark.parametrize("num_items", [None, 29])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_loss_and_gradients_equal_trl(trainers, beta, num_items):
    """Fused and TRL's float32 loss and student gradients both agree with TRL's loss computed in
    float64 (the models cast to double) within 2e-5 of the loss and 1e-4 of each parameter's largest
    gradient entry. Measured: at most 1.5e-7 (loss) and 4.4e-6 (gradients) relative for the fused
    loss, 2.5e-7 and 4.4e-6 for TRL's (the gradient error is the float32 model's, shared by both):
    margins of >20x. A wrong direction moves this loss by 0.65% (300x the bound) and the gradients
    by 100% of their largest entry."""
    fused, ours = trainers
    fused.beta = ours.beta = beta
    student, teacher = fused.model, fused.teacher_model
    inputs = batch()
    count = None if num_items is None else torch.tensor(num_items)  # as the Trainer passes it: a tensor

    head_inputs = []
    hook = student.lm_head.register_forward_hook(lambda _m, args, _out: head_inputs.append(args[0].shape))
    try:
        fused_loss, fused_grads = loss_and_grads(lambda: fused.compute_loss(student, inputs, num_items_in_batch=count),
                                                 student)
    finally:
        hook.remove()
    assert head_inputs == [torch.Size([3, 1, 64])]  # the student's lm-head saw one position per row
    trl_loss, trl_grads = loss_and_grads(lambda: ours.compute_loss(student, inputs, num_items_in_batch=count), student)

    student64, teacher64 = float64_copy(student), float64_copy(teacher)
    oracle = types.SimpleNamespace(teacher_model=teacher64, beta=beta,
                                   generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    exact_loss, exact_grads = loss_and_grads(
        lambda: GKDTrainer.compute_loss(oracle, student64, inputs, num_items_in_batch=count), student64)

    assert 0.1 < float(exact_loss) < 100.0  # a real divergence, not two near-uniform distributions
    assert fused_loss.dtype == torch.float32
    for loss in (fused_loss, trl_loss):
        assert abs(float(loss) - float(exact_loss)) <= 2e-5 * float(exact_loss)
    assert fused_grads.keys() == trl_grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        scale = float(exact.abs().max())
        for grads in (fused_grads, trl_grads):
            assert float((grads[name].double() - exact).abs().max()) <= 1e-4 * scale + 1e-12, name


def test_no_counted_row_gives_an_attached_zero(trainers):
    fused, ours = trainers
    fused.beta = 0.0
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss = fused.compute_loss(fused.model, inputs)
    assert float(loss) == 0.0 and loss.requires_grad
    ours.beta = 0.0
    assert float(ours.compute_loss(ours.model, inputs)) == 0.0  # TRL gives 0 too
    fused.model.zero_grad(set_to_none=True)
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in fused.model.parameters() if p.grad is not None)


def test_return_outputs_is_refused(trainers):
    fused, _ = trainers
    with pytest.raises(ValueError, match="return_outputs: .*never forms the student's \\(B, T, V\\) logits"):
        fused.compute_loss(fused.model, batch(), return_outputs=True)


def test_mixture_beta_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"^beta: .*beta=0.0 .*beta=1.0 .*got 0.5$"):
        FusedGKDTrainer(model=tiny_llama(0), teacher_model=tiny_llama(1), args=gkd_config(tmp_path, 0.5),
                        train_dataset=dataset(), processing_class=tokenizer)


def test_teacher_with_another_softcap_is_refused(tokenizer, tmp_path):
    torch.manual_seed(1)
    gemma2 = AutoModelForCausalLM.from_config(tiny_config("gemma2"))  # final-logit softcap 30, vocabulary 512
    with pytest.raises(ValueError, match=r"^teacher_model: its final-logit softcap 30.0 differs from .* None"):
        FusedGKDTrainer(model=tiny_llama(0), teacher_model=gemma2, args=gkd_config(tmp_path, 1.0),
                        train_dataset=dataset(), processing_class=tokenizer)


def test_trains_on_policy_and_saves_a_checkpoint(tokenizer, tmp_path):
    """Two steps of trainer.train() with lmbda=1 (every batch generated by the student through TRL),
    on TRL's "messages" format; the vocabulary is the tokenizer's, so that generated ids are valid."""
    vocab = len(tokenizer)
    student, teacher = tiny_llama(0, vocab_size=vocab), tiny_llama(1, vocab_size=vocab)
    args = gkd_config(tmp_path, 0.0, lmbda=1.0, max_new_tokens=8, max_length=64, per_device_train_batch_size=2,
                      max_steps=2, logging_steps=1, save_steps=2, learning_rate=1e-3)
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(),
                              processing_class=tokenizer)
    generated = []
    generate = trainer.generate_on_policy_outputs

    def spy(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        generated.append(outputs[0].shape)
        return outputs

    trainer.generate_on_policy_outputs = spy
    trainer.train()
    assert len(generated) == 2  # every step's batch came from the student's generate
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert trainer.state.global_step == 2
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
