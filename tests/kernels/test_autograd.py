"""What the autograd layer does and says: no gradient products when nothing needs a gradient, a
plain refusal of double backward, and messages that name what came."""
from __future__ import annotations

import pytest
import torch

from opsdl_kernels import fused_rkl_loss

from .inputs import IMPLS, make_inputs
from .tracking import Tracker


@pytest.mark.parametrize("impl", IMPLS)
def test_no_gradient_products_when_no_input_requires_one(impl):
    """Grad mode on, nothing requiring grad (an evaluation outside ``torch.no_grad``): the loss is
    the no-gradient forward's, two logit products per slab (none on the fused Triton forward), no
    gradient product, no gradient buffer."""
    inputs = make_inputs((24,), 16, 300, dtype=torch.float32, seed=86)
    for key in ("student_hidden", "weight"):
        inputs[key] = inputs[key].detach()
    with Tracker() as tracked:
        loss = fused_rkl_loss(**inputs, impl=impl)
    assert not loss.requires_grad
    assert len(tracked.products) == (0 if impl == "triton" else 2)
    assert all(p.out_dtype == torch.float32 and p.n == 300 for p in tracked.products)  # logits only


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_double_backward_is_refused_in_plain_words(memory):
    inputs = make_inputs((6,), 16, 300, dtype=torch.float32, seed=85)
    loss = fused_rkl_loss(**inputs, memory=memory)
    with pytest.raises(RuntimeError, match="not itself differentiable: a double backward"):
        torch.autograd.grad(loss, inputs["student_hidden"], create_graph=True)


def test_a_teacher_of_another_width_without_its_head_is_named():
    inputs = make_inputs((4,), 16, 300, dtype=torch.float32, seed=87)
    with pytest.raises(ValueError, match=r"teacher_hidden: width 24 differs from student_hidden's 16, and "
                                         r"teacher_weight is None"):
        fused_rkl_loss(inputs["student_hidden"], torch.randn(4, 24), inputs["weight"])


def test_targets_of_a_float_dtype_are_named_as_needing_integers():
    inputs = make_inputs((4,), 16, 300, dtype=torch.float32, seed=88)
    inputs["targets"] = inputs["targets"].float()
    with pytest.raises(ValueError, match="targets: expected an integer tensor, got dtype torch.float32"):
        fused_rkl_loss(**inputs)


def test_out_of_range_targets_on_counted_rows_are_named_with_their_values():
    inputs = make_inputs((4,), 16, 300, dtype=torch.float32, seed=89, mask=True)
    inputs["targets"][~inputs["mask"]] = -100  # an ignore index on rows that do not count is fine
    fused_rkl_loss(**inputs, estimator="sampled")
    inputs["targets"][0] = 300
    with pytest.raises(ValueError, match=r"targets: expected token ids in \[0, 300\) on the rows that count, "
                                         r"got values in \[300, 300\]"):
        fused_rkl_loss(**inputs, estimator="sampled")
