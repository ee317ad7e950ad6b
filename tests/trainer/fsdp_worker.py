"""The rank side of tests/trainer/test_fsdp.py, started there with ``torchrun`` (not a test module).

    torchrun --nproc-per-node 2 tests/trainer/fsdp_worker.py JOB.json

JOB.json: {"gradients": [model folders], "grad_out": path, "train": [TrainConfig fields, ...],
"fail_on_rank": rank or null}. Every rank joins one gloo group and runs the jobs in order.
"""
from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import opsdl.objective
import opsdl.rollout_engines
from opsdl_kernels import fused_rkl_loss
from opsdl.fsdp import init_ranks, release_process_group, shard, whole
from opsdl.model import lm_head
from opsdl.options import TrainConfig
from opsdl.objective import distillation_loss, packed_rows
from opsdl.train_fsdp import train_fsdp


def sequences(vocab: int, count: int, seed: int) -> tuple[list, list, list]:
    """Student prompts, teacher prompts and responses of assorted lengths, the same on every rank."""
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> list[int]:
        return torch.randint(0, vocab, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return ([draw(12, 30) for _ in range(count)], [draw(4, 10) for _ in range(count)],
            [draw(2, 7) for _ in range(count)])


def gradient_errors(folder: str, ranks, memory: str) -> dict:
    """Every parameter's gradient of one distillation step, sharded over the ranks (each with its
    share of the sequences, the loss scaled by the global token count) against one process with all
    of them (the mean over all tokens): the largest difference relative to the largest gradient.
    ``memory``: the fused loss's path ("lean" recomputes the teacher's logits in the backward, from
    the teacher's gathered head)."""
    opsdl.objective.fused_rkl_loss = functools.partial(fused_rkl_loss, memory=memory)
    cfg = TrainConfig(estimator="full", impl="torch")
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():  # a teacher that differs from the student, with its own head
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    students, teachers, responses = sequences(student.config.vocab_size, 2 * ranks.world, seed=7)
    targets = torch.tensor([t for r in responses for t in r])

    reference = copy.deepcopy(student)
    with torch.no_grad():
        teacher_rows = packed_rows(teacher, teachers, responses, "cpu")
    loss, _ = distillation_loss(cfg, lm_head(reference), lm_head(teacher), packed_rows(reference, students, responses,
                                                                                       "cpu"), teacher_rows, targets)
    loss.backward()

    policy, sharded_teacher = shard(student, ranks, bf16=False), shard(teacher, ranks, bf16=False)
    mine = slice(2 * ranks.rank, 2 * ranks.rank + 2)
    my_targets = torch.tensor([t for r in responses[mine] for t in r])
    with torch.no_grad():
        my_teacher_rows = sharded_teacher(teachers[mine], responses[mine], mode="rows")
    with whole(sharded_teacher):
        loss_sum, _ = policy(students[mine], responses[mine], mode="distill", cfg=cfg, targets=my_targets,
                             teacher_rows=my_teacher_rows, teacher_head=lm_head(sharded_teacher.model))
        (loss_sum * ranks.world / len(targets)).backward()
    opsdl.objective.fused_rkl_loss = fused_rkl_loss

    expected = dict(reference.named_parameters())
    worst, head_error = 0.0, None
    for name, param in policy.model.named_parameters():
        got = param.grad.full_tensor()
        want = expected[name].grad
        error = float((got - want).abs().max() / want.abs().max())
        worst = max(worst, error)
        if param is lm_head(policy.model).weight:
            head_error = error
    return {"worst": worst, "lm_head": head_error, "tied": student.config.tie_word_embeddings,
            "loss": float(loss)}


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    ranks = init_ranks("cpu")
    if job.get("gradients"):
        errors = {f"{folder} {memory}": gradient_errors(folder, ranks, memory) for folder in job["gradients"]
                  for memory in ("fast", "lean")}
        if ranks.main:
            Path(job["grad_out"]).write_text(json.dumps(errors))
    if job.get("fail_on_rank") == ranks.rank:
        rank = ranks.rank  # not the Ranks object: it is deleted below, before the group is destroyed

        def broken_sample(*args, **kwargs):
            raise RuntimeError(f"injected failure on rank {rank}")

        opsdl.rollout_engines.sample = broken_sample
    for fields in job.get("train", []):
        seen = spy_on_loss_dtypes()
        train_fsdp(TrainConfig(**fields))
        if ranks.main:  # the dtypes the fused loss saw (hidden states, lm-head), per run
            (Path(fields["out"]) / "loss_dtypes.json").write_text(json.dumps(sorted(set(seen))))
    opsdl.objective.fused_rkl_loss = fused_rkl_loss
    del ranks  # its device mesh holds the group
    destroy_group()


def destroy_group() -> None:
    """opsdl.fsdp.release_process_group(), and a check that it freed the group (joined its gloo
    threads): a group that something still holds keeps its gloo threads alive into the
    interpreter's finalization, where they abort the process by chance (SIGABRT, "terminate called
    without an active exception"; tests/kernels/vocab_parallel_worker.py has the whole story)."""
    release_process_group()
    left = []
    for task in Path("/proc/self/task").glob("*/comm"):  # Linux; nothing elsewhere
        try:
            left += [name for name in [task.read_text().strip()] if "gloo" in name]
        except OSError:  # a thread that ended meanwhile
            pass
    if left:
        raise RuntimeError(f"gloo threads {left} outlived destroy_process_group(): something still holds the "
                           "process group, and this process would exit racing them")


def spy_on_loss_dtypes() -> list:
    """Record the dtypes of the hidden states and the lm-head each fused-loss call of the loop gets."""
    seen = []

    def spy(student_rows, teacher_rows, weight, *args, **kwargs):
        seen.append(f"{student_rows.dtype} {weight.dtype}")
        return fused_rkl_loss(student_rows, teacher_rows, weight, *args, **kwargs)

    opsdl.objective.fused_rkl_loss = spy
    return seen


if __name__ == "__main__":
    main(sys.argv[1])
