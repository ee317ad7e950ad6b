"""The objective's lm-heads in the compute dtype: cast once per step, gradients in the fp32 master."""
from __future__ import annotations

import torch

from opsdl.model import LMHead
from opsdl.objective import ComputeHeads
from opsdl_kernels import fused_rkl_loss
from tests.kernels.reference import reference_kl


def _micro_batches(generator, count: int, rows: int, hidden: int):
    return [(torch.randn(rows, hidden, generator=generator).bfloat16(),
             torch.randn(rows, hidden, generator=generator).bfloat16()) for _ in range(count)]


def test_bf16_head_gradients_accumulate_in_the_float32_master():
    """Two micro-batches through the once-cast bf16 head give the master weight the same .grad as a
    differentiable cast per micro-batch (autocast's way, which also rounds each micro-batch's dW to
    bf16), bit for bit, and that gradient is within bf16 rounding of float64."""
    generator = torch.Generator().manual_seed(0)
    vocab, hidden = 96, 32
    master = torch.nn.Parameter(torch.randn(vocab, hidden, generator=generator) * 0.3)
    teacher = LMHead(torch.randn(vocab, hidden, generator=generator) * 0.3, None, None)
    batches = _micro_batches(generator, 2, 24, hidden)

    heads = ComputeHeads(LMHead(master, None, None), teacher, torch.bfloat16)
    heads.refresh()
    assert heads.student.weight.dtype == torch.bfloat16 and heads.teacher.weight.dtype == torch.bfloat16
    for student, teacher_rows in batches:
        fused_rkl_loss(student, teacher_rows, heads.student.weight, heads.teacher.weight, impl="torch",
                       reduction="sum").backward()
        assert heads.student.weight.grad is None  # moved into the master after each backward
    ours = master.grad.clone()
    assert ours.dtype == torch.float32

    master.grad = None
    for student, teacher_rows in batches:
        fused_rkl_loss(student, teacher_rows, master.bfloat16(), teacher.weight.bfloat16(), impl="torch",
                       reduction="sum").backward()
    assert torch.equal(ours, master.grad)

    exact = torch.zeros(vocab, hidden, dtype=torch.float64)
    for student, teacher_rows in batches:  # float64 at the bf16 values the loss saw
        exact += reference_kl(student, teacher_rows, master.detach().bfloat16(), teacher.weight.bfloat16(),
                              reduction="sum")[1][1]
    error = float((ours.double() - exact).norm() / exact.norm())
    assert error < 4 * 2**-8, error  # bf16 logits and dW (2^-8 relative), with a 4x margin


def test_teacher_heads_are_recast_only_when_their_weights_change():
    master = torch.nn.Parameter(torch.randn(8, 4))
    frozen = LMHead(torch.randn(8, 4), None, None)
    heads = ComputeHeads(LMHead(master, None, None), frozen, torch.bfloat16)
    heads.refresh()
    first_student, first_teacher = heads.student.weight, heads.teacher.weight
    heads.refresh()
    assert heads.teacher.weight is first_teacher  # frozen: cast once per run
    assert heads.student.weight is not first_student  # the student: once per step
    frozen.weight.lerp_(torch.zeros(8, 4), 0.5)  # an EMA update bumps the tensor's version
    heads.refresh()
    assert heads.teacher.weight is not first_teacher
    assert torch.equal(heads.teacher.weight, frozen.weight.bfloat16())

    live = ComputeHeads(LMHead(master, None, None), LMHead(master, None, None), torch.bfloat16)
    live.refresh()
    assert live.teacher is live.student  # one weight, read once by the fused loss
    same = ComputeHeads(LMHead(master, None, None), frozen, torch.float32)
    same.refresh()
    assert same.student.weight is master and same.teacher.weight is frozen.weight
