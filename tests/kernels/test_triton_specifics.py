"""What only the Triton path has: the fused forward's vocabulary splits and autotuning, the row
kernel's launch, configs, availability; and what the interpreter skips, imitated on the CPU."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import triton

from opsdl_kernels import fused_kl_loss, fused_rkl_loss, fused_token_logprobs, torch_impl
from opsdl_kernels import triton_impl
from opsdl_kernels.schedule import Operands
from opsdl_kernels.state import P, LossSpec
from opsdl_kernels.triton_impl import forward
from opsdl_kernels.triton_impl.configs import (
    FALLBACK_CONFIG, FORWARD_CONFIGS, SHARED_MEMORY_LIMIT, VOCAB_SPLIT_ALIGN, shared_memory_bytes,
)
from opsdl_kernels.triton_impl.forward import plan_vocab_splits

from .inputs import make_inputs
from .reference import reference_kl, rel_err


def _operands(inputs: dict, spec: LossSpec) -> Operands:
    w = inputs["weight"].detach()
    return Operands(spec, inputs["student_hidden"].detach(), inputs["teacher_hidden"], w, w,
                    inputs["bias"].detach(), inputs["teacher_bias"], inputs["targets"])


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("kind", ["kl", "sampled"])
def test_vocab_split_merge_is_exact(splits, kind):
    inputs = make_inputs((5,), 16, 700, dtype=torch.float32, seed=31, bias=True, teacher_bias=True)
    ops = _operands(inputs, LossSpec(kind, temperature=0.9, reverse_weight=0.6 if kind == "kl" else 1.0))
    assert plan_vocab_splits(5, 700, torch.device("cpu"), splits)[0] == splits
    got = triton_impl.forward_state(ops, vocab_splits=splits)
    want = torch_impl.forward_state(ops, budget=1 << 20)
    finals = ["lse_s", "lse_t", "logp_y", "logq_y"] + (["kl_r", "kl_f"] if kind == "kl" else [])
    for name in finals:
        assert rel_err(got[P[name]], want[P[name]]) < 1e-6, name


def test_split_plan_fills_small_batches_and_aligns():
    splits, size = plan_vocab_splits(128, 128256, torch.device("cpu"))
    assert splits > 1 and size % VOCAB_SPLIT_ALIGN == 0 and (splits - 1) * size < 128256 <= splits * size
    assert plan_vocab_splits(100_000, 128256, torch.device("cpu"))[0] == 1


def _cpu_bench(kernel_call, quantiles):
    """What the autotuner's GPU benchmarker returns, timed on the CPU (the interpreter has none)."""
    start = time.perf_counter()
    kernel_call()
    elapsed = time.perf_counter() - start
    return [elapsed] * len(quantiles)


def test_autotuning_leaves_the_first_call_right(monkeypatch):
    """The fused forward's autotuner really tries two configs on the first call (as on a GPU, where
    benchmarking runs the kernel several times on the call's own buffers); the first call's result
    must equal the second's, untuned, and the float64 reference. (An autotuner that zeroed a buffer
    it shared with an input once returned zero gradients on every first call.) N is in the key by
    its power-of-two bucket: 6 rows reuse the config tuned at 7, 20 rows are tuned anew."""
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 16}, num_warps=1, num_stages=1),
               triton.Config({"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    tuner = forward.autotuned(configs, do_bench=_cpu_bench)(forward.kl_forward_fn)
    monkeypatch.setattr(forward, "kl_forward_kernel", tuner)
    inputs = make_inputs((7,), 16, 300, dtype=torch.float32, seed=34, bias=True)
    ref_loss, _ = reference_kl(**inputs)
    with torch.no_grad():
        first = fused_rkl_loss(**inputs, impl="triton", reduction="none")
        assert len(tuner.cache) == 1, "the autotuner did not benchmark"
        second = fused_rkl_loss(**inputs, impl="triton", reduction="none")
    assert torch.equal(first, second)
    assert rel_err(first.mean(), ref_loss) < 1e-5
    for rows, tuned in ((6, 1), (20, 2)):
        inputs = make_inputs((rows,), 16, 300, dtype=torch.float32, seed=34 + rows, bias=True)
        with torch.no_grad():
            loss = fused_rkl_loss(**inputs, impl="triton")
        assert len(tuner.cache) == tuned, (rows, list(tuner.cache))
        assert rel_err(loss, reference_kl(**inputs)[0]) < 1e-5


@pytest.mark.parametrize("table", [FORWARD_CONFIGS])
def test_configs_fit_shared_memory(table):
    for gen, configs in table.items():
        assert configs, gen
        for config in configs:
            need = shared_memory_bytes(config, 2)
            assert need <= SHARED_MEMORY_LIMIT[gen], f"{gen} {config}: {need} B > {SHARED_MEMORY_LIMIT[gen]} B"
            assert VOCAB_SPLIT_ALIGN % config.kwargs["BLOCK_V"] == 0
    for gen in SHARED_MEMORY_LIMIT:  # the fallback fits everywhere, even with fp32 inputs
        assert shared_memory_bytes(FALLBACK_CONFIG, 4) <= SHARED_MEMORY_LIMIT[gen]


def test_no_kernel_uses_atomics():
    """The design rule the first GPU run taught (atomics made the old backward 5-8x slower)."""
    source = Path(triton_impl.__file__).parent
    uses = [f"{p.name}: {m.group(0)}" for p in sorted(source.glob("*.py"))
            for m in re.finditer(r"tl\.atomic_\w+", p.read_text())]
    assert not uses, uses


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_nothing_is_created_on_the_default_device(memory):
    """On a GPU the test mode sets CUDA as the default device; a tensor made without ``device=``
    would land there while the inputs are elsewhere. Here the default is the meta device: any such
    tensor breaks the computation."""
    inputs = make_inputs((6,), 16, 300, dtype=torch.float32, seed=35, bias=True, mask=True, token_weights=True)
    ref_loss, ref_grads = reference_kl(**inputs)
    with torch.device("meta"):
        loss, ratio = fused_rkl_loss(**inputs, impl="triton", memory=memory, return_log_ratio=True)
        loss.backward()
        with torch.no_grad():
            no_grad = fused_rkl_loss(**inputs, impl="triton")
        empty = fused_token_logprobs(inputs["student_hidden"][:0], inputs["weight"], inputs["targets"][:0],
                                     impl="triton")
    assert loss.device.type == ratio.device.type == no_grad.device.type == empty.device.type == "cpu"
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(no_grad, ref_loss) < 1e-5
    assert rel_err(inputs["weight"].grad, ref_grads[1]) < 1e-5


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


@pytest.mark.parametrize("pin", ["0", "1"])
def test_autotune_pruning_on_a_gpu_and_pinning(pin, monkeypatch):
    """What the prune hook returns on a GPU (the interpreter skips it): the configs listed for the
    card's generation that fit its shared memory, only the first with OPSDL_PIN_CONFIG=1 (the GPU
    test mode), the fallback when none fits."""
    from opsdl_kernels.triton_impl import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "generation", lambda device: gen)
    monkeypatch.setattr(configs.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("OPSDL_PIN_CONFIG", pin)
    prune = configs.prune_for_device(FORWARD_CONFIGS)
    for gen, element in (("hopper", torch.bfloat16), ("ampere_small", torch.float32)):
        kept = prune(configs.all_configs(FORWARD_CONFIGS), {"h_ptr": torch.empty(1, dtype=element)})
        fitting = [c for c in FORWARD_CONFIGS[gen]
                   if shared_memory_bytes(c, torch.empty(0, dtype=element).element_size()) <= SHARED_MEMORY_LIMIT[gen]]
        assert kept == ((fitting[:1] if pin == "1" else fitting) or [FALLBACK_CONFIG]), (gen, kept)


def _without_column(inputs: dict, col: int) -> dict:
    """The same distributions with vocabulary column ``col`` removed (what a -inf logit there means),
    targets renumbered past it."""
    keep = [v for v in range(inputs["weight"].shape[0]) if v != col]
    out = dict(inputs, weight=inputs["weight"].detach()[keep], bias=inputs["bias"].detach()[keep],
               teacher_bias=inputs["teacher_bias"][keep])
    out["targets"] = inputs["targets"] - (inputs["targets"] > col).long()
    return out


def _with_zero_row(grad: torch.Tensor, col: int) -> torch.Tensor:
    return torch.cat([grad[:col], torch.zeros_like(grad[:1]), grad[col:]])


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("estimator", ["full", "sampled"])
@pytest.mark.parametrize("memory", ["fast", "lean", "no_grad"])
def test_minus_inf_logits_count_for_nothing(memory, estimator, impl):
    """A -inf bias entry (and a -inf teacher bias at the same column): that column has probability 0
    under both, so everything equals the float64 reference without it (which NaNs with it: 0 * inf);
    its weight and bias gradients are 0. Both KL directions are mixed, so both accumulators see it."""
    col = 5
    inputs = make_inputs((9,), 16, 300, dtype=torch.float32, seed=36, bias=True, teacher_bias=True)
    inputs["targets"] = torch.where(inputs["targets"] == col, col + 1, inputs["targets"])
    with torch.no_grad():
        inputs["bias"][col] = float("-inf")
        inputs["teacher_bias"][col] = float("-inf")
    options = dict(estimator=estimator, temperature=0.9, reverse_weight=0.7 if estimator == "full" else 1.0)
    ref_loss, ref_grads = reference_kl(**_without_column(inputs, col), **options)
    if memory == "no_grad":
        with torch.no_grad():
            loss = fused_kl_loss(**inputs, **options, impl=impl)
        assert torch.isfinite(loss) and rel_err(loss, ref_loss) < 2e-5
        return
    loss = fused_kl_loss(**inputs, **options, impl=impl, memory=memory)
    loss.backward()
    assert torch.isfinite(loss) and rel_err(loss, ref_loss) < 2e-5
    dh, dw, db = inputs["student_hidden"].grad, inputs["weight"].grad, inputs["bias"].grad
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert rel_err(dh, ref_grads[0]) < 2e-5
    assert rel_err(dw, _with_zero_row(ref_grads[1], col)) < 2e-5
    assert rel_err(db, _with_zero_row(ref_grads[2], col)) < 2e-5


@pytest.mark.parametrize("kind", ["kl", "logprob"])
def test_no_grad_forward_fused_or_slabs_give_the_same_state(kind, monkeypatch):
    """OPSDL_NO_GRAD_FORWARD picks the fused kernel (default) or the lean path's slab loop of
    products and row state kernel; both finish the same state. Any other value is refused by name."""
    inputs = make_inputs((6,), 16, 700, dtype=torch.float32, seed=37, bias=True, teacher_bias=True)
    spec = LossSpec(kind, temperature=0.8, reverse_weight=0.6 if kind == "kl" else 1.0)
    ops = _operands(inputs, spec)
    if kind == "logprob":
        ops = Operands(spec, ops.h, None, ops.weight, None, ops.bias, None, ops.targets)
    monkeypatch.delenv(forward.NO_GRAD_FORWARD, raising=False)
    fused = triton_impl.forward_state(ops, budget=1 << 20)
    monkeypatch.setenv(forward.NO_GRAD_FORWARD, "slabs")
    slabs = triton_impl.forward_state(ops, budget=0)  # the smallest plan: slabs of 256 columns, 3 per row
    finals = ["lse_s", "logp_y"] + (["lse_t", "logq_y", "kl_r", "kl_f"] if kind == "kl" else [])
    for name in finals:  # two fp32 summation orders
        assert rel_err(slabs[P[name]], fused[P[name]]) < 1e-5, name
    monkeypatch.setenv(forward.NO_GRAD_FORWARD, "cublas")
    with pytest.raises(ValueError, match="OPSDL_NO_GRAD_FORWARD must be one of 'fused', 'slabs', got 'cublas'"):
        with torch.no_grad():
            fused_rkl_loss(**inputs, impl="triton")
