"""The product forms of ``matmul.py``: each fp32-output form probed on its own; the same results
whichever forms exist (mm and addmm with ``out_dtype``, mm only, neither); no V x H fp32 copy of the
weight where only ``addmm(out_dtype=)`` is missing; one warning per process when a weight is upcast;
``scaled_mm_`` ignores what its output held and applies alpha before the single rounding; CPUs
without 16-bit products compute them from fp32 blocks."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

from opsdl_kernels import fused_rkl_loss, matmul, plan, torch_impl
from opsdl_kernels.matmul import ProductForms, product_forms, scaled_mm_
from opsdl_kernels.schedule import Operands, fast_forward_backward, lean_backward, lean_forward
from opsdl_kernels.state import LossSpec

from .inputs import DEVICE, clear_grads, grads_of, make_inputs
from .reference import reference_kl, rel_err
from .tracking import Tracker

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="emulates the CUDA product forms on the CPU")

_mm, _addmm = torch.mm, torch.addmm


@pytest.fixture
def fresh_probe():
    """Probe results and warnings as in a new process, before and after the test."""
    matmul._probe.cache_clear()
    yield
    matmul._probe.cache_clear()


def _refuse_out_dtype(product):
    def refusing(*args, out_dtype=None, **kwargs):
        if out_dtype is not None:
            raise RuntimeError("out_dtype is not supported here (as torch 2.8/2.9 refuse it for addmm on CUDA)")
        return product(*args, **kwargs)
    return refusing


def _emulate_out_dtype(product):
    """``product(..., out_dtype=torch.float32)`` on the CPU as a CUDA torch >= 2.8 computes it: exact
    products of the 16-bit operands summed in fp32, written in fp32; its own tensors untracked."""
    def emulated(*args, out_dtype=None, out=None, **kwargs):
        if out_dtype is None:
            return product(*args, out=out, **kwargs) if out is not None else product(*args, **kwargs)
        with _disable_current_modes():
            result = product(*(a.float() for a in args), **kwargs)
            return result if out is None else out.copy_(result)
    return emulated


FORMS = {
    "mm_and_addmm": dict(mm=_emulate_out_dtype(_mm), addmm=_emulate_out_dtype(_addmm)),
    "mm_only": dict(mm=_emulate_out_dtype(_mm), addmm=_refuse_out_dtype(_addmm)),
    "neither": dict(mm=_mm, addmm=_addmm),
}


def _use_forms(monkeypatch, name: str) -> None:
    for attr, product in FORMS[name].items():
        monkeypatch.setattr(torch, attr, product)


def test_each_form_is_probed_on_its_own(fresh_probe, monkeypatch):
    assert product_forms(torch.device("meta"), torch.bfloat16) == ProductForms(mm=True, addmm=True)
    assert product_forms(torch.device("cpu"), torch.bfloat16) == ProductForms(mm=False, addmm=False)
    matmul._probe.cache_clear()
    monkeypatch.setattr(torch, "addmm", _refuse_out_dtype(_addmm))
    assert product_forms(torch.device("meta"), torch.float16) == ProductForms(mm=True, addmm=False)
    _use_forms(monkeypatch, "mm_only")
    assert product_forms(torch.device("cpu"), torch.bfloat16) == ProductForms(mm=True, addmm=False)
    assert product_forms(torch.device("cpu"), torch.float16) == ProductForms(mm=True, addmm=False)


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_same_results_whichever_forms_exist(fresh_probe, monkeypatch, memory):
    monkeypatch.setattr(plan, "MIN_FAST_ROWS", 8)
    inputs = make_inputs((40,), 32, 700, dtype=torch.bfloat16, seed=61, bias=True)
    budget = {"fast": 16 * 700 * 8, "lean": 1 << 16}[memory]  # 3 chunks, or 3 slabs
    results = {}
    for name in FORMS:
        matmul._probe.cache_clear()
        _use_forms(monkeypatch, name)
        clear_grads(inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = fused_rkl_loss(**inputs, impl="torch", memory=memory, memory_budget=budget)
        loss.backward()
        results[name] = (loss.detach(), *grads_of(inputs))
    expected = results.pop("neither")
    ref_loss, ref_grads = reference_kl(**inputs)
    assert rel_err(expected[0], ref_loss) < 1e-5
    for name, got in results.items():
        assert rel_err(got[0], expected[0]) < 1e-6, name
        for label, g, e, r in zip(("dh", "dW", "db"), got[1:], expected[1:], ref_grads):
            # the same fp32 sums up to their order: at most a rounding of the bf16 gradient apart
            assert rel_err(g, e) < 1e-2 and rel_err(g, r) < 2e-2, (name, label)


def _meta_operands(n: int, hidden: int, vocab: int) -> Operands:
    h = torch.empty(n, hidden, dtype=torch.bfloat16, device="meta")
    w = torch.empty(vocab, hidden, dtype=torch.bfloat16, device="meta")
    targets = torch.empty(n, dtype=torch.long, device="meta")
    return Operands(LossSpec("kl"), h, torch.empty_like(h), w, w, None, None, targets)


def _fp32_weight_copies(tracker: Tracker, vocab: int, hidden: int) -> list:
    return [a for a in tracker.allocated if a == ((vocab, hidden), vocab * hidden * 4)]


@pytest.mark.parametrize("forms", ["mm_and_addmm", "mm_only", "neither"])
def test_no_fp32_weight_copy_unless_mm_is_missing(fresh_probe, monkeypatch, forms):
    """On the meta device (products with out_dtype exist there, as on CUDA): the lean path's logit
    products and its fp32 dh accumulation (addmm, or mm + add) use the bf16 weight itself."""
    n, hidden, vocab = 512, 64, 4096
    if forms == "mm_only":
        monkeypatch.setattr(torch, "addmm", _refuse_out_dtype(_addmm))
    if forms == "neither":
        monkeypatch.setattr(matmul, "_probe", lambda *key: ProductForms(mm=False, addmm=False))
    ops = _meta_operands(n, hidden, vocab)
    lean = plan.lean_plan(n, hidden, vocab, True, 1 << 22)
    matmul.has_fp32_output("meta")  # the probe's own tensors stay out of the count
    with Tracker() as tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = lean_forward(torch_impl, ops, lean)
        lean_backward(torch_impl, ops, state, torch.empty(n, device="meta"), 1.0, lean, (True, True, False))
        fast_forward_backward(torch_impl, _meta_operands(n, hidden, vocab), None, 1.0 / n, n, (True, True, False))
    copies = _fp32_weight_copies(tracker, vocab, hidden)
    assert (len(copies) > 0) == (forms == "neither"), copies


def test_weight_upcast_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(matmul, "_warned", set())
    inputs = make_inputs((16,), 32, 300, dtype=torch.bfloat16, seed=62)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for memory in ("fast", "lean", "fast"):
            fused_rkl_loss(**inputs, impl="torch", memory=memory).backward()
    upcasts = [str(w.message) for w in caught if "fp32 copy of the weight" in str(w.message)]
    print(upcasts[0] if upcasts else "no warning")
    assert len(upcasts) == 1
    assert torch.__version__ in upcasts[0] and "cpu (capability" in upcasts[0]
    assert "37.5 KiB for this 300 x 32 weight" in upcasts[0]
    # where the products go depends on the CPU: oneDNN's bf16 math mode where it has bf16 units
    assert ("fp32 rate" in upcasts[0]) != ("bf16 units" in upcasts[0])


@pytest.mark.parametrize("dtype,native", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True),
                                          (torch.bfloat16, False), (torch.float16, False)],
                         ids=["fp32", "bf16", "fp16", "bf16-fp32-blocks", "fp16-fp32-blocks"])
def test_scaled_mm_ignores_what_out_held_and_scales_before_rounding(monkeypatch, dtype, native):
    monkeypatch.setattr(matmul, "native_16bit_products", lambda dt: native)
    monkeypatch.setattr(matmul, "UPCAST_BLOCK", 64 * 8)  # several blocks of rows and of the inner dimension
    gen = torch.Generator().manual_seed(63)
    a = (torch.rand(70, 300, generator=gen) * 32).to(dtype)
    b = (torch.rand(300, 20, generator=gen) * 64).to(dtype)
    exact = a.double() @ b.double()  # entries near 3e5: beyond fp16's range before the scale
    alpha = 2.0 ** -10
    out = torch.full((70, 20), float("nan"), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scaled_mm_(out, a, b, alpha, accumulate=False)
        assert torch.isfinite(out).all() and rel_err(out, alpha * exact) < 4e-3
        scaled_mm_(out[:, 5:], a, b[:, 5:], alpha, accumulate=True)
    assert rel_err(out[:, 5:], 2 * alpha * exact[:, 5:]) < 4e-3 and rel_err(out[:, :5], alpha * exact[:, :5]) < 4e-3


@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_without_16bit_products_computes_them_from_fp32_blocks(monkeypatch, memory, dtype):
    """What an AVX2 CPU gets (bf16 and fp16 products in reference loops below 1 GFLOP/s): the same
    gradients from fp32 blocks, and one warning that says so."""
    inputs = make_inputs((48,), 32, 700, dtype=dtype, seed=64, bias=True)
    ref_loss, ref_grads = reference_kl(**inputs)
    monkeypatch.setattr(matmul, "_warned", set())
    monkeypatch.setattr(matmul, "native_16bit_products", lambda dt: False)
    monkeypatch.setattr(matmul, "UPCAST_BLOCK", 4096)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = fused_rkl_loss(**inputs, impl="torch", memory=memory)
        loss.backward()
    assert rel_err(loss, ref_loss) < 1e-5
    for got, want in zip(grads_of(inputs), ref_grads):
        assert rel_err(got, want) < 2e-2
    slow = [str(w.message) for w in caught if "gradient products run at the fp32 rate" in str(w.message)]
    assert len(slow) == 1, slow
