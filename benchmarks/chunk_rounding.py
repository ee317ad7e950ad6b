"""How the fast path's dW error grows with the number of row chunks (one rounding of dW to the
weight's dtype per chunk), against float64, beside the lean path's.

    python -m benchmarks.chunk_rounding [--n 4096] [--hidden 64] [--vocab 2048] [--dtype bfloat16]

Runs on the CPU (the PyTorch implementation: the same products and roundings as on a GPU).
"""
from __future__ import annotations

import argparse

import torch

from opsdl_kernels import fused_rkl_loss, plan
from tests.kernels.reference import reference_kl

from .measure import relative_norm_error
from .problems import Shape, make_problem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    shape, dtype = Shape(args.n, args.hidden, args.vocab), getattr(torch, args.dtype)
    problem = make_problem(shape, dtype, "cpu", seed=3)
    _, (ref_dh, ref_dw, _) = reference_kl(problem.student, problem.teacher, problem.weight)
    plan.MIN_FAST_ROWS = 1  # let small budgets cut this batch into many chunks
    print(f"N={shape.n} H={shape.hidden} V={shape.vocab} {args.dtype}: relative error against float64")
    print("| path | chunks | dh | dW |\n|---|---|---|---|")
    for chunks in (1, 2, 8, 16, 64):
        problem.clear_grads()
        budget = -(-shape.n // chunks) * shape.vocab * 8
        fused_rkl_loss(problem.student, problem.teacher, problem.weight, impl="torch", memory="fast",
                       memory_budget=budget).backward()
        print(f"| fast | {chunks} | {relative_norm_error(problem.student.grad, ref_dh):.2%} "
              f"| {relative_norm_error(problem.weight.grad, ref_dw):.2%} |")
    problem.clear_grads()
    fused_rkl_loss(problem.student, problem.teacher, problem.weight, impl="torch", memory="lean").backward()
    print(f"| lean | - | {relative_norm_error(problem.student.grad, ref_dh):.2%} "
          f"| {relative_norm_error(problem.weight.grad, ref_dw):.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
