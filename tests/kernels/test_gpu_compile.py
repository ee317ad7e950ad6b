"""The kernels compile for Hopper and Ampere in every variant a launch can specialise (absent inputs,
integer arguments equal to 1), and every autotune config of the fused forward fits the shared memory."""
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kernels are compiled and run for real")
def test_every_config_compiles_for_its_gpu_within_shared_memory():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.kernels.compile_for_gpu"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["gen"] for r in results} == set(SHARED_MEMORY_LIMIT)
    variants = {(r["kernel"], r["variant"]) for r in results}
    assert {("forward", "ones"), ("rows", "ones"), ("rows", "fast_kl"), ("rows", "lean_backward_sampled"),
            ("forward", "logprobs")} <= variants and len(results) >= 40
    for r in results:
        assert r["shared"] <= SHARED_MEMORY_LIMIT[r["gen"]], r
        if r["kernel"] == "rows" and r["variant"].startswith("lean_backward"):
            # a 16-bit G overwrites logits other warps read: the store waits at a barrier (a
            # gradient-only pass has no reduction that would synchronise the warps otherwise)
            assert r["grad"] == "*bf16" and r["barriers"] > 0, r
        if r["kernel"] == "forward":
            config = triton.Config(r["config"], num_stages=r["num_stages"])
            # the estimate the autotune pruning relies on is an upper bound of what the compiler takes
            assert r["shared"] <= shared_memory_bytes(config, 2), r
