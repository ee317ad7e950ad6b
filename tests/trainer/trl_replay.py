"""The TRL tests' rows and settings, and what the ranks of a launched OPSDLTrainer trained on
(``trl_rank_worker.py``'s records), read back and replayed in one process (tests/trainer/
test_trl_launch.py: DDP, DeepSpeed; tests/trainer/test_trl_fsdp.py: FSDP2)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer
from opsdl.model import load_model

WORKER = Path(__file__).with_name("trl_rank_worker.py")
ROWS = [  # four, so that two ranks see different prompts
    {"long_context": "Notes on the garden. " * 12 + "The vault code is 4417. " + "More notes. " * 6,
     "short_context": "The vault code is 4417.", "question": "What is the vault code?"},
    {"long_context": "A log of the week. " * 9 + "Maria owns the red bicycle.",
     "short_context": "Maria owns the red bicycle.", "question": "Who owns the red bicycle?"},
    {"long_context": "Minutes of the meeting. " * 10 + "The train leaves at nine. " + "Any other business. " * 4,
     "short_context": "The train leaves at nine.", "question": "When does the train leave?"},
    {"long_context": "A recipe book. " * 11 + "The soup needs three onions.",
     "short_context": "The soup needs three onions.", "question": "How many onions does the soup need?"},
]


def config(tmp_path: Path, **overrides) -> OPSDLConfig:
    """Greedy rollouts of at most 8 tokens, scored at temperature 1 (as `opsdl train --temperature 0`),
    float32, a constant rate, one step, no checkpoints."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=8, max_steps=1,
                    report_to=[], use_cpu=True, generation_kwargs={"do_sample": False}, seed=0, fused_impl="torch",
                    logging_steps=1, shuffle_dataset=False, bf16=False, lr_scheduler_type="constant",
                    save_strategy="no")
    return OPSDLConfig(**{**settings, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], root: Path, teachers: list[str], overrides: dict, env: dict | None = None,
           timeout: int = 600) -> None:
    """The worker under ``launcher`` (a module and its options) on ROWS, two steps per teacher, one
    thread per rank, ``env`` added to the environment; its records land in ``root``."""
    job = {"rows": ROWS, "out": str(root), "teachers": teachers, "config": {"max_steps": 2, **overrides}}
    (root / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           **(env or {})}
    done = subprocess.run([sys.executable, "-m", *launcher, str(WORKER), str(root / "job.json")],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def load(root: Path, teacher: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """Both ranks' records of one teacher's run: (rank{r}.json, {what: [rank 0's, rank 1's]})."""
    out = root / teacher
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    whats = sorted({f.name.split("-", 1)[1][:-3] for f in out.glob("rank0-*.pt")})
    return ranks, {what: [torch.load(out / f"rank{r}-{what}.pt") for r in (0, 1)] for what in whats}


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    return {name: float((got[name] - ref).norm() / ref.norm()) for name, ref in want.items()}


def reference_trainer(tmp_path: Path, initial: dict, **overrides) -> OPSDLTrainer:
    """One process's OPSDLTrainer on ROWS from the weights the ranks started from."""
    model, tokenizer = load_model("tiny:llama", seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(initial[name])
    trainer = OPSDLTrainer(model, args=config(tmp_path, **overrides), train_dataset=Dataset.from_list(ROWS),
                           processing_class=tokenizer)
    trainer.model.train()
    return trainer


def replay_step(reference: OPSDLTrainer, ranks: list[dict], step: int) -> dict[str, torch.Tensor]:
    """Each rank's batch of optimizer step ``step`` (1-based) through the reference's own
    ``_prepare_training_batch`` and ``compute_loss``: the same greedy rollouts and losses as on that
    rank are asserted; returns the mean of the per-batch gradients (what a reduction over the ranks
    of their token-mean gradients gives), and checks that one rank's gradient alone is far from it."""
    by_question = {row["question"]: row for row in ROWS}
    per_batch = []
    for result in ranks:
        record = result["batches"][step - 1]
        reference.model.zero_grad(set_to_none=True)
        batch = reference._prepare_training_batch([by_question[q] for q in record["questions"]])
        completions = [ids[m.bool()].tolist() for ids, m in zip(batch["completion_ids"], batch["completion_mask"])]
        assert completions == record["completions"]  # the same greedy rollouts as on that rank
        loss = reference.compute_loss(reference.model, batch)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(result["losses"][step - 1]["loss"], rel=1e-5, abs=1e-9)
        per_batch.append({n: p.grad.detach().clone() for n, p in reference.model.named_parameters()})
    mean = {name: (per_batch[0][name] + per_batch[1][name]) / 2 for name in per_batch[0]}
    assert max(relative_errors(per_batch[0], mean).values()) > 1e-2  # a bound of 1e-4 on the mean discriminates
    return mean


def check_first_step(reference: OPSDLTrainer, mean: dict, initial: dict, after: dict) -> None:
    """The reference's own (TRL default) optimizer, stepped once from ``initial`` with the gradient
    ``mean``, lands within 1e-3 * lr of the ranks' weights ``after`` step 1 (elements whose gradient
    is within ~eps=1e-8 of 0 amplify any gradient rounding), and that step moved them by ~lr."""
    optimizer = reference.create_optimizer()
    for name, param in reference.model.named_parameters():
        param.grad = mean[name].clone()
    optimizer.step()
    lr = reference.args.learning_rate
    moved = max(float((after[k] - initial[k]).abs().max()) for k in after)
    worst = max(float((p.detach() - after[n]).abs().max()) for n, p in reference.model.named_parameters())
    assert moved > 0.5 * lr and worst < 1e-3 * lr, (moved, worst)
