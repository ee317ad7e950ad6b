"""What only the Triton path has: vocabulary splits, gradient filtering, configs, availability."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from opsdl_kernels import fused_rkl_loss, torch_impl
from opsdl_kernels import triton as triton_impl
from opsdl_kernels.api import AUTO_FILTER_EPS
from opsdl_kernels.triton.configs import (
    BACKWARD_CONFIGS, FALLBACK_CONFIG, FORWARD_CONFIGS, SHARED_MEMORY_LIMIT, VOCAB_SPLIT_ALIGN, shared_memory_bytes,
)
from opsdl_kernels.triton.forward import plan_vocab_splits

from .inputs import TOLERANCE, make_inputs
from .reference import reference_kl, rel_err


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("sampled", [False, True])
def test_vocab_split_merge_is_exact(splits, sampled):
    inputs = make_inputs((5,), 16, 700, dtype=torch.float32, seed=31, bias=True, teacher_bias=True)
    args = (inputs["student_hidden"].detach(), inputs["teacher_hidden"], inputs["weight"].detach(),
            inputs["weight"].detach(), inputs["bias"].detach(), inputs["teacher_bias"], inputs["targets"])
    opts = dict(temperature=0.9, softcap=None, reverse_weight=0.6 if not sampled else 1.0, sampled=sampled)
    assert plan_vocab_splits(5, 700, torch.device("cpu"), splits)[0] == splits
    got = triton_impl.kl_forward(*args, **opts, vocab_splits=splits)
    want = torch_impl.kl_forward(*args, **opts)
    for a, b in zip(got, want):
        if b is not None:
            assert rel_err(a, b) < 1e-6


def test_split_plan_fills_small_batches_and_aligns():
    splits, size = plan_vocab_splits(128, 128256, torch.device("cpu"))
    assert splits > 1 and size % VOCAB_SPLIT_ALIGN == 0 and (splits - 1) * size < 128256 <= splits * size
    assert plan_vocab_splits(100_000, 128256, torch.device("cpu"))[0] == 1


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_gradient_filter_stays_within_rounding(estimator):
    """Peaked distributions (most tiles negligible): filtered bf16 gradients keep the accuracy of the
    exact ones against the float64 reference, and the filter really skipped tiles."""
    inputs = make_inputs((4,), 32, 1280, dtype=torch.bfloat16, seed=32, logit_scale=20.0)
    ref_loss, ref_grads = reference_kl(**inputs, estimator=estimator)
    grads = {}
    for eps in (None, AUTO_FILTER_EPS[torch.bfloat16]):
        inputs["student_hidden"].grad = inputs["weight"].grad = None
        fused_rkl_loss(**inputs, estimator=estimator, impl="triton", filter_eps=eps).backward()
        grads[eps] = (inputs["student_hidden"].grad, inputs["weight"].grad)
    exact, filtered = grads[None], grads[AUTO_FILTER_EPS[torch.bfloat16]]
    assert any(not torch.equal(a, b) for a, b in zip(exact, filtered)), "no tile was skipped: the test is vacuous"
    for e, f, want in zip(exact, filtered, ref_grads):
        assert rel_err(f, want) <= TOLERANCE[torch.bfloat16]
        assert rel_err(f, want) <= rel_err(e, want) + 2.0**-8  # filtering adds at most bf16 rounding


@pytest.mark.parametrize("table,backward", [(FORWARD_CONFIGS, False), (BACKWARD_CONFIGS, True)])
def test_configs_fit_shared_memory(table, backward):
    for gen, configs in table.items():
        assert configs, gen
        for config in configs:
            need = shared_memory_bytes(config, 2, backward)
            assert need <= SHARED_MEMORY_LIMIT[gen], f"{gen} {config}: {need} B > {SHARED_MEMORY_LIMIT[gen]} B"
            assert VOCAB_SPLIT_ALIGN % config.kwargs["BLOCK_V"] == 0
    for gen in SHARED_MEMORY_LIMIT:  # the fallback fits everywhere, even with fp32 inputs
        assert shared_memory_bytes(FALLBACK_CONFIG, 4, backward) <= SHARED_MEMORY_LIMIT[gen]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no CUDA device exists")
def test_triton_without_cuda_or_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from opsdl_kernels import fused_rkl_loss\n"
        "h = torch.randn(3, 8); w = torch.randn(50, 8)\n"
        "try:\n"
        "    fused_rkl_loss(h, h, w, impl='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
        "print('AUTO', float(fused_rkl_loss(h, h + 1, w, impl='auto')) > 0)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR impl='triton' cannot run here" in out.stdout and "AUTO True" in out.stdout


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_backward_over_several_vocabulary_slabs(estimator, monkeypatch):
    """A 16-bit weight's dW accumulates in fp32 one vocabulary slab at a time; force three slabs."""
    from opsdl_kernels.triton import backward

    inputs = make_inputs((6,), 16, 700, dtype=torch.float16, seed=33, bias=True, teacher_bias=True)
    monkeypatch.setattr(backward, "DW_SLAB_BYTES", VOCAB_SPLIT_ALIGN * 4 * 16)
    assert backward._dw_slab_columns(700, 16, torch.float16) == VOCAB_SPLIT_ALIGN
    ref_loss, ref_grads = reference_kl(**inputs, estimator=estimator, softcap=4.0)
    loss = fused_rkl_loss(**inputs, estimator=estimator, softcap=4.0, impl="triton", filter_eps=None)
    loss.backward()
    got = (inputs["student_hidden"].grad, inputs["weight"].grad, inputs["bias"].grad)
    for label, a, b in zip(("dh", "dW", "db"), got, ref_grads):
        assert rel_err(a, b) <= TOLERANCE[torch.float16], label
