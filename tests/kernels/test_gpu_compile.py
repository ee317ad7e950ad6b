"""The kernels compile for Hopper and Ampere in every variant a launch can specialise (absent inputs,
integer arguments equal to 1), every autotune config of the fused forward fits the shared memory,
nothing spills to local memory, and the row kernels keep barriers out of their column loops."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from opsdl_kernels.triton_impl.configs import SHARED_MEMORY_LIMIT, shared_memory_bytes

ROOT = Path(__file__).resolve().parents[2]

compiles_here = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="on a GPU machine the kernels are compiled and run for real")


def _compile_for_gpu(*args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _in_registers(r: dict) -> bool:
    return r["stack"] == r["local"] == r["local_loads"] == r["local_stores"] == 0


@compiles_here
def test_every_config_compiles_for_its_gpu_within_shared_memory():
    results = _compile_for_gpu()
    assert {r["gen"] for r in results} == set(SHARED_MEMORY_LIMIT)
    variants = {(r["kernel"], r["variant"]) for r in results}
    assert {("forward", "ones"), ("row_state", "ones"), ("row_grad", "ones"), ("row_state", "kl_mixed"),
            ("row_grad", "sampled"), ("forward", "logprobs")} <= variants and len(results) >= 50
    for r in results:
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["gen"]], r
        # every kernel in every variant, every autotune config of the fused forward included, keeps
        # what it holds in registers (the forward's two accumulators and its online update too)
        assert _in_registers(r), r
        if r["kernel"] == "forward":
            config = triton.Config(r["config"], num_stages=r["num_stages"])
            # the estimate the autotune pruning relies on is an upper bound of what the compiler takes
            assert r["shared"] <= shared_memory_bytes(config, 2), r


ROW_VARIANTS = ("kl_mixed", "teacher", "logprob", "kl_bf16", "kl_fp32", "sampled")


@compiles_here
def test_row_kernels_keep_barriers_out_of_the_column_loop_and_never_spill():
    """Both row kernels with their real launch (one row per program, ROW_WARPS warps, their blocks)
    for sm_90 and sm_80: the exact KL (both directions mixed, bf16 and fp32 G), one direction and the
    sampled estimator, log-probs."""
    results = _compile_for_gpu("--kernels", "row_state,row_grad", "--gens", "hopper,ampere",
                               "--variants", ",".join(ROW_VARIANTS))
    assert len(results) == 2 * 7, [(r["kernel"], r["variant"]) for r in results]
    for r in results:
        assert _in_registers(r), r  # nothing in local memory: no spill, no stack frame
        if r["kernel"] == "row_state":
            # The column loop keeps per-lane state and never synchronises. After it, the one merge
            # of the lanes per row is two cross-warp reductions (a max, then all rescaled sums in one
            # tensor), each with at most two barriers (partials stored, then read; the shared
            # buffer's reuse): 4 at most, whatever the row's width.
            assert r["loop_barriers"] == 0 and r["barriers"] <= 4, r
        elif r["grad"] == "*fp32":
            # no reduction, and an fp32 G overwrites only the logit it is computed from
            assert r["barriers"] == 0, r
        else:
            # a 16-bit G over logits other threads read: the one barrier, in the loop (taken in
            # steps 0, 1, 2, 4, 8, ... only)
            assert r["barriers"] == r["loop_barriers"] == 1 and r["grad"] == "*bf16", r
