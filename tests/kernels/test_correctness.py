"""Both implementations, both gradient paths and the no-gradient forward against the float64
reference, every option, three dtypes."""
from __future__ import annotations

import zlib

import pytest
import torch

from opsdl_kernels import fused_kl_loss, fused_rkl_loss, fused_token_logprobs

from .inputs import DTYPES, IMPLS, MEMORY, TOLERANCE, clear_grads, cpu_randn, grads_of, make_inputs
from .reference import reference_kl, reference_logprobs, rel_err

# (name, shape options for make_inputs, loss options)
CASES = [
    ("full", dict(lead=(9,), hidden=16, vocab=300), dict()),
    ("single_row", dict(lead=(1,), hidden=13, vocab=257), dict()),
    ("mask_weights_sum", dict(lead=(11,), hidden=20, vocab=300, mask=True, token_weights=True), dict(reduction="sum")),
    ("bias_temp_softcap", dict(lead=(8,), hidden=24, vocab=333, bias=True, teacher_bias=True),
     dict(temperature=0.7, softcap=4.0)),
    ("separate_teacher_none", dict(lead=(7,), hidden=24, vocab=301, teacher_hidden=40), dict(reduction="none")),
    ("leading_dims_odd_h", dict(lead=(2, 5), hidden=33, vocab=517, mask=True), dict()),
    ("sampled", dict(lead=(10,), hidden=16, vocab=300, mask=True, token_weights=True, bias=True),
     dict(estimator="sampled", softcap=5.0, temperature=1.3)),
    ("sampled_separate_none", dict(lead=(2, 4), hidden=24, vocab=290, teacher_hidden=12, teacher_bias=True),
     dict(estimator="sampled", reduction="none")),
    ("mixed_directions", dict(lead=(9,), hidden=16, vocab=300, bias=True), dict(reverse_weight=0.3)),
    ("forward_kl", dict(lead=(6,), hidden=16, vocab=300, teacher_hidden=20), dict(reverse_weight=0.0, temperature=2.0)),
]


# The fast path needs a reduction (it forms the gradient in the forward); "none" takes the lean one.
PATH_CASES = [(c, memory) for c in CASES for memory in MEMORY if not (memory == "fast" and c[2].get("reduction") == "none")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,memory", PATH_CASES, ids=[f"{c[0]}-{m}" for c, m in PATH_CASES])
def test_kl_matches_float64_reference(case, memory, impl, dtype, error_log):
    name, shape, options = case
    inputs = make_inputs(**shape, dtype=dtype, seed=zlib.crc32(name.encode()))
    upstream = torch.randn(shape["lead"]) if options.get("reduction") == "none" else None
    ref_loss, ref_grads = reference_kl(**inputs, **options, upstream=upstream)

    loss = fused_kl_loss(**inputs, **options, impl=impl, memory=memory)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    with torch.no_grad():  # the fused forward (Triton) or the lean forward (PyTorch)
        no_grad_loss = fused_kl_loss(**inputs, **options, impl=impl, memory=memory)

    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    tol = TOLERANCE[dtype]
    errors = {"loss": rel_err(loss, ref_loss), "loss_nograd": rel_err(no_grad_loss, ref_loss)}
    for label, got, want in zip(("d_hidden", "d_weight", "d_bias"), grads_of(inputs), ref_grads):
        if want is None:
            continue
        assert got is not None and got.dtype == dtype, f"{label}: missing or wrong dtype"
        errors[label] = rel_err(got, want)
    error_log(f"{impl}-{memory}", dtype, errors)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{name} {impl} {memory} {dtype}: errors {bad} above {tol}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "bias_temp_softcap"])
def test_token_logprobs_match_reference(impl, dtype, reduction, with_options, error_log):
    inputs = make_inputs((3, 4), 19, 311, dtype=dtype, seed=7, bias=with_options)
    h, w, y, b = inputs["student_hidden"], inputs["weight"], inputs["targets"], inputs.get("bias")
    options = dict(temperature=0.8, softcap=6.0) if with_options else {}
    upstream = {"none": cpu_randn(3, 4, seed=8), "mean": torch.full((3, 4), 1 / 12), "sum": torch.ones(3, 4)}[reduction]
    ref, ref_grads = reference_logprobs(h, w, y, bias=b, upstream=upstream, **options)
    logp = fused_token_logprobs(h, w, y, bias=b, impl=impl, reduction=reduction, **options)
    (logp * upstream).sum().backward() if reduction == "none" else logp.backward()
    assert logp.shape == ((3, 4) if reduction == "none" else ())
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    errors = {"logprob": rel_err(logp, ref)}
    for label, got, want in zip(("d_hidden", "d_weight", "d_bias"), (h.grad, w.grad, None if b is None else b.grad), ref_grads):
        if want is not None:
            errors[label] = rel_err(got, want)
    error_log(f"{impl}-logprob", dtype, errors)
    assert all(v <= TOLERANCE[dtype] for v in errors.values()), errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_identical_views_give_zero_kl_and_zero_gradient(impl, memory):
    inputs = make_inputs((6,), 16, 300, dtype=torch.float32, seed=3, bias=True)
    inputs["teacher_hidden"] = inputs["student_hidden"].detach().clone()
    for estimator in ("full", "sampled"):
        clear_grads(inputs)
        loss = fused_rkl_loss(**inputs, estimator=estimator, reduction="sum", impl=impl, memory=memory,
                              teacher_bias=inputs["bias"].detach())
        loss.backward()
        assert loss.item() == 0.0
        for grad in grads_of(inputs):
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("impl", IMPLS)
def test_near_identical_views_absolute_error(impl):
    """KL of two close distributions is a small difference of large numbers: absolute tolerance."""
    inputs = make_inputs((8,), 32, 400, dtype=torch.float32, seed=4, logit_scale=8.0)
    noise = cpu_randn(*inputs["student_hidden"].shape, seed=5) * 1e-3
    inputs["teacher_hidden"] = inputs["student_hidden"].detach() + noise
    ref_loss, ref_grads = reference_kl(**inputs, reduction="none", upstream=torch.ones(8))
    loss = fused_rkl_loss(**inputs, reduction="none", impl=impl)
    loss.sum().backward()
    assert 0 < float(ref_loss.min()) and float(ref_loss.max()) < 1e-4  # the case is what it claims
    assert float((loss.detach().double() - ref_loss).abs().max()) < 2e-6
    assert rel_err(inputs["student_hidden"].grad, ref_grads[0]) < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_extreme_logits_stay_finite_and_correct(impl, memory):
    inputs = make_inputs((5,), 16, 300, dtype=torch.float32, seed=6, logit_scale=1.0)
    with torch.no_grad():
        inputs["weight"].mul_(1e4 / inputs["weight"].abs().max() / 4)  # |z| up to ~1e4
    for estimator in ("full", "sampled"):
        clear_grads(inputs)
        ref_loss, ref_grads = reference_kl(**inputs, estimator=estimator)
        loss = fused_rkl_loss(**inputs, estimator=estimator, impl=impl, memory=memory)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads_of(inputs) if g is not None)
        assert rel_err(loss, ref_loss) < 1e-4
        # one-hot distributions: the full KL's true gradients are ~1e-100 (compare absolutely),
        # the sampled one's are ~1e6 (compare relatively)
        for got, want in zip(grads_of(inputs)[:2], ref_grads[:2]):
            assert float((got.double() - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_nan_input_gives_nan_not_zero(impl, memory):
    inputs = make_inputs((4,), 16, 300, dtype=torch.float32, seed=8)
    with torch.no_grad():
        inputs["student_hidden"][2, 5] = float("nan")
    per_row = fused_rkl_loss(**inputs, reduction="none", impl=impl)
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[[0, 1, 3]]).all()
    loss = fused_rkl_loss(**inputs, impl=impl, memory=memory)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(inputs["weight"].grad).any()
    assert torch.isnan(inputs["student_hidden"].grad[2]).all() and torch.isfinite(inputs["student_hidden"].grad[[0, 1, 3]]).all()
    logp = fused_token_logprobs(inputs["student_hidden"], inputs["weight"], inputs["targets"], impl=impl)
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3]]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_all_rows_masked_gives_zero_loss_and_zero_grads(impl, estimator):
    inputs = make_inputs((2, 3), 16, 300, dtype=torch.float32, seed=9, bias=True)
    inputs["mask"] = torch.zeros(2, 3, dtype=torch.bool)
    with torch.no_grad():
        inputs["student_hidden"][0, 0] = float("nan")  # masked rows are never computed
    loss = fused_rkl_loss(**inputs, estimator=estimator, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    for grad in grads_of(inputs):
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_zero_in_reduction_none(impl):
    inputs = make_inputs((3, 4), 16, 300, dtype=torch.float32, seed=10, mask=True, token_weights=True)
    per_row = fused_rkl_loss(**inputs, reduction="none", impl=impl)
    assert torch.equal(per_row[~inputs["mask"]], torch.zeros_like(per_row[~inputs["mask"]]))
    assert (per_row[inputs["mask"]] > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_teacher_side_is_constant(impl, memory):
    inputs = make_inputs((5,), 16, 300, dtype=torch.float32, seed=11, teacher_bias=True)
    inputs["teacher_hidden"].requires_grad_()
    inputs["teacher_bias"].requires_grad_()
    fused_rkl_loss(**inputs, impl=impl, memory=memory).backward()
    assert inputs["teacher_hidden"].grad is None and inputs["teacher_bias"].grad is None
    # teacher_weight=weight (the same tensor) gives exactly the gradient of teacher_weight=None
    w_grad = inputs["weight"].grad.clone()
    clear_grads(inputs)
    fused_rkl_loss(**inputs, teacher_weight=inputs["weight"], impl=impl, memory=memory).backward()
    assert torch.equal(inputs["weight"].grad, w_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("memory", MEMORY)
def test_non_contiguous_inputs(impl, memory):
    base = make_inputs((6,), 16, 300, dtype=torch.float32, seed=12)
    wide = cpu_randn(6, 32, seed=13)
    h = wide[:, ::2].clone().requires_grad_()  # contiguous leaf for the reference
    h_view = wide[:, ::2].requires_grad_()  # stride (32, 2)
    w_t = base["weight"].detach().t().contiguous().t().requires_grad_()  # column-major (V, H)
    g = cpu_randn(16, 6, seed=14).t()
    ref_loss, ref_grads = reference_kl(h, g, w_t)
    loss = fused_rkl_loss(h_view, g, w_t, impl=impl, memory=memory)
    loss.backward()
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(wide.grad[:, ::2] if wide.grad is not None else h_view.grad, ref_grads[0]) < 1e-5
    assert rel_err(w_t.grad, ref_grads[1]) < 1e-5
