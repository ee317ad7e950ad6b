"""The CPU path's speed paths are exact: the row math compiled by torch.compile (large blocks) gives
the float64 reference's values, as eager does; a failed compile falls back to eager with one
warning; -inf logits (a -inf bias entry) contribute 0, compiled or not; an AVX2 CPU (imitated) is
seen as one without 16-bit products and still gets the right gradients. No timing is asserted."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from opsdl_kernels import fused_kl_loss, fused_token_logprobs, torch_impl

from .inputs import DEVICE, TOLERANCE, clear_grads, grads_of, make_inputs
from .reference import reference_kl, reference_logprobs, rel_err

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU implementation's own paths")

# each case compiles two graphs (state, gradient) the first time: a few seconds apiece
COMPILED_CASES = {
    "kl_fast_fp32_bias_mixed": (torch.float32, dict(bias=True), dict(reverse_weight=0.5, memory="fast")),
    "sampled_lean_fp32_softcap": (torch.float32, dict(teacher_bias=True),
                                  dict(estimator="sampled", softcap=5.0, temperature=0.7, memory="lean")),
    "logprob_fast_bf16": (torch.bfloat16, dict(), None),
}


def _loss(inputs: dict, options) -> torch.Tensor:
    if options is None:
        return fused_token_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"], impl="torch",
                                    reduction="mean", memory="fast")
    return fused_kl_loss(**inputs, **options, impl="torch")


def _reference(inputs: dict, options):
    if options is None:
        n = inputs["targets"].numel()
        value, grads = reference_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"],
                                          upstream=torch.full((n,), 1.0 / n))
        return value.mean(), grads
    return reference_kl(**inputs, **{k: v for k, v in options.items() if k != "memory"})


@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_row_math_matches_reference_and_eager(case, monkeypatch):
    dtype, shape_options, options = COMPILED_CASES[case]
    inputs = make_inputs((64,), 32, 1000, dtype=dtype, seed=71, **shape_options)
    ref_loss, ref_grads = _reference(inputs, options)
    compiled = []
    real = torch_impl._compiled
    monkeypatch.setattr(torch_impl, "_compiled", lambda fn: compiled.append(fn.__name__) or real(fn))
    runs = {}
    for label, threshold in (("eager", 1 << 62), ("compiled", 0)):
        monkeypatch.setattr(torch_impl, "COMPILE_MIN_ELEMENTS", threshold)
        clear_grads(inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the bf16 weight's fp32 copy
            loss = _loss(inputs, options)
            loss.backward()
        runs[label] = (loss.detach(), *grads_of(inputs))
        assert rel_err(loss, ref_loss) < 1e-5, label
        for got, want in zip(runs[label][1:], ref_grads):
            assert (got is None) == (want is None) and (got is None or rel_err(got, want) <= TOLERANCE[dtype]), label
    assert set(compiled) == ({"_student_stats", "_target_grad_"} if options is None else
                             {"_pair_stats", "_kl_grad_" if "estimator" not in options else "_target_grad_"})
    assert rel_err(runs["compiled"][0], runs["eager"][0]) < 1e-6


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def no_compiler(fn):
        def fail(*args):
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler found\n(details)")
        return fail

    monkeypatch.setattr(torch_impl, "_compiled", no_compiler)
    monkeypatch.setattr(torch_impl, "_compile_failed", [])
    monkeypatch.setattr(torch_impl, "COMPILE_MIN_ELEMENTS", 0)
    inputs = make_inputs((24,), 16, 300, dtype=torch.float32, seed=72, bias=True)
    ref_loss, ref_grads = reference_kl(**inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for memory in ("fast", "lean"):
            clear_grads(inputs)
            loss = fused_kl_loss(**inputs, impl="torch", memory=memory)
            loss.backward()
            assert rel_err(loss, ref_loss) < 1e-5
            assert all(rel_err(g, r) < 2e-5 for g, r in zip(grads_of(inputs), ref_grads))
    failures = [str(w.message) for w in caught if "torch.compile of the CPU row math failed" in str(w.message)]
    print(failures)
    assert len(failures) == 1 and "no C++ compiler found" in failures[0] and "(details)" not in failures[0]


MINUS_INF = [3, 100, *range(256, 512)]  # scattered columns, and the whole second slab of 256
# lean: slabs of 256 columns, the second of them -inf throughout (a block maximum of -inf)
BUDGET = {"fast": None, "lean": 1 << 16}


def _minus_inf_inputs(estimator_targets: bool) -> tuple[dict, torch.Tensor]:
    inputs = make_inputs((24,), 16, 600, dtype=torch.float32, seed=73, bias=True, teacher_bias=True,
                         targets=estimator_targets)
    keep = torch.tensor([v for v in range(600) if v not in set(MINUS_INF)])
    with torch.no_grad():
        inputs["bias"][MINUS_INF] = float("-inf")
        inputs["teacher_bias"][MINUS_INF] = float("-inf")
    if estimator_targets:
        inputs["targets"] = keep[inputs["targets"] % len(keep)]
    return inputs, keep


def _without_minus_inf(inputs: dict, keep: torch.Tensor) -> dict:
    """The same problem without the -inf columns (the reference NaNs on them: 0 * -inf)."""
    out = dict(inputs, weight=inputs["weight"][keep], bias=inputs["bias"][keep],
               teacher_bias=inputs["teacher_bias"][keep])
    if "targets" in inputs:
        out["targets"] = torch.searchsorted(keep, inputs["targets"])
    return out


@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("options,compiled", [(dict(), False), (dict(reverse_weight=0.5), False),
                                              (dict(reverse_weight=0.5), True)],  # the variant compiled above
                         ids=["reverse-eager", "mixed-eager", "mixed-compiled"])
def test_minus_inf_bias_columns_contribute_nothing(options, compiled, memory, monkeypatch):
    monkeypatch.setattr(torch_impl, "COMPILE_MIN_ELEMENTS", 0 if compiled else 1 << 62)
    inputs, keep = _minus_inf_inputs(False)
    ref_loss, (ref_dh, ref_dw, ref_db) = reference_kl(**_without_minus_inf(inputs, keep), **options)
    loss = fused_kl_loss(**inputs, **options, impl="torch", memory=memory, memory_budget=BUDGET[memory])
    loss.backward()
    dh, dw, db = grads_of(inputs)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(dh, ref_dh) < 2e-5 and rel_err(dw[keep], ref_dw) < 2e-5 and rel_err(db[keep], ref_db) < 2e-5
    assert torch.equal(dw[MINUS_INF], torch.zeros_like(dw[MINUS_INF])) and torch.equal(db[MINUS_INF], db.new_zeros(len(MINUS_INF)))


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_minus_inf_bias_in_token_logprobs_and_sampled_estimator(memory):
    inputs, keep = _minus_inf_inputs(True)
    fewer = _without_minus_inf(inputs, keep)
    n = inputs["targets"].numel()
    ref_logp, (ref_dh, ref_dw, ref_db) = reference_logprobs(fewer["student_hidden"], fewer["weight"], fewer["targets"],
                                                            bias=fewer["bias"], upstream=torch.full((n,), -1.0 / n))
    loss = -fused_token_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"], bias=inputs["bias"],
                                 impl="torch", reduction="mean", memory=memory, memory_budget=BUDGET[memory])
    loss.backward()
    dh, dw, db = grads_of(inputs)
    assert rel_err(loss, -ref_logp.mean()) < 1e-5
    assert rel_err(dh, ref_dh) < 2e-5 and rel_err(dw[keep], ref_dw) < 2e-5 and rel_err(db[keep], ref_db) < 2e-5
    assert not dw[MINUS_INF].any() and not db[MINUS_INF].any()
    clear_grads(inputs)
    ref_loss, (ref_dh, ref_dw, _) = reference_kl(**fewer, estimator="sampled")
    loss = fused_kl_loss(**inputs, estimator="sampled", impl="torch", memory=memory, memory_budget=BUDGET[memory])
    loss.backward()
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(inputs["student_hidden"].grad, ref_dh) < 2e-5
    assert rel_err(inputs["weight"].grad[keep], ref_dw) < 2e-5


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_teacher_minus_inf_where_the_student_has_mass_is_an_infinite_kl(memory):
    inputs = make_inputs((8,), 16, 300, dtype=torch.float32, seed=74, teacher_bias=True, targets=False)
    with torch.no_grad():
        inputs["teacher_bias"][7] = float("-inf")
    per_row = fused_kl_loss(**inputs, impl="torch", memory="lean", reduction="none")
    assert torch.equal(per_row, torch.full_like(per_row, float("inf")))
    loss = fused_kl_loss(**inputs, impl="torch", memory=memory)
    assert loss.item() == float("inf")


AVX2_CHECK = textwrap.dedent("""
    import torch
    from opsdl_kernels import fused_rkl_loss, matmul
    from tests.kernels.inputs import clear_grads, grads_of, make_inputs
    from tests.kernels.reference import reference_kl, rel_err
    print(torch.backends.cpu.get_cpu_capability(), matmul.native_16bit_products(torch.bfloat16))
    inputs = make_inputs((40,), 32, 700, dtype=torch.bfloat16, seed=75, bias=True)
    ref_loss, ref_grads = reference_kl(**inputs)
    for memory in ("fast", "lean"):
        clear_grads(inputs)
        loss = fused_rkl_loss(**inputs, impl="torch", memory=memory)
        loss.backward()
        print(memory, rel_err(loss, ref_loss), max(rel_err(g, r) for g, r in zip(grads_of(inputs), ref_grads)))
""")


def test_imitated_avx2_cpu_has_no_16bit_products_and_gets_right_gradients():
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2", OPSDL_TEST_DEVICE="cpu")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", AVX2_CHECK], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0] in ("AVX2 False", "DEFAULT False")
    for line in lines[1:3]:
        memory, loss_error, grad_error = line.split()
        assert float(loss_error) < 1e-5 and float(grad_error) < 2e-2, line


def test_compiled_code_is_cached_per_vector_width(monkeypatch):
    """torch 2.13's inductor cache does not key on the instruction set: code made under
    ATEN_CPU_CAPABILITY=avx2 (8 lanes) and loaded under AVX-512 wrote past its buffers (a heap
    corruption, seen), and the reverse computed half the lanes. The width is named in the options,
    which the cache key includes."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    torch_impl._compiled.__wrapped__(torch_impl._student_stats)
    assert seen == [dict(dynamic=True, options={"cpp.simdlen": pick_vec_isa().bit_width()})]
