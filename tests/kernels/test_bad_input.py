"""Bad input gets a ValueError that names the argument."""
from __future__ import annotations

import pytest
import torch

from opsdl_kernels import fused_kl_loss, fused_rkl_loss, fused_token_logprobs

from .inputs import make_inputs


def _base():
    return make_inputs((2, 3), 8, 50, dtype=torch.float32, seed=41)


def _set(key, value):
    def edit(kw):
        kw[key] = value(kw) if callable(value) else value
    return edit


BAD = [
    ("teacher_hidden", _set("teacher_hidden", lambda kw: torch.randn(3, 2, 8))),
    ("weight", _set("weight", lambda kw: torch.randn(50, 9))),
    ("weight", _set("weight", lambda kw: torch.randn(0, 8))),
    ("weight", _set("weight", lambda kw: torch.randn(50, 8, dtype=torch.float16))),
    ("teacher_weight", _set("teacher_weight", lambda kw: torch.randn(50, 8, dtype=torch.float16))),
    ("teacher_weight", _set("teacher_weight", lambda kw: torch.randn(49, 8))),
    ("teacher_weight", _set("teacher_weight", lambda kw: torch.randn(50, 7))),
    ("teacher_hidden", _set("teacher_hidden", lambda kw: torch.randn(2, 3, 6))),
    ("student_hidden", _set("student_hidden", lambda kw: torch.randint(0, 3, (2, 3, 8)))),
    ("targets", lambda kw: kw.update(estimator="sampled", targets=None)),
    ("targets", _set("targets", lambda kw: torch.full((2, 3), 50))),
    ("targets", _set("targets", lambda kw: torch.full((2, 3), -1))),
    ("targets", _set("targets", lambda kw: torch.zeros(3, 2, dtype=torch.long))),
    ("targets", _set("targets", lambda kw: torch.zeros(2, 3))),
    ("reduction", _set("reduction", "avg")),
    ("estimator", _set("estimator", "exact")),
    ("impl", _set("impl", "cuda")),
    ("temperature", _set("temperature", 0.0)),
    ("temperature", _set("temperature", float("nan"))),
    ("softcap", _set("softcap", -1.0)),
    ("mask", _set("mask", lambda kw: torch.ones(2, 3))),
    ("mask", _set("mask", lambda kw: torch.ones(6, dtype=torch.bool))),
    ("token_weights", _set("token_weights", lambda kw: torch.ones(2, 3, dtype=torch.long))),
    ("bias", _set("bias", lambda kw: torch.randn(49))),
    ("teacher_bias", _set("teacher_bias", lambda kw: torch.randn(50, 1))),
    ("memory", _set("memory", "small")),
    ("memory", lambda kw: kw.update(memory="fast", reduction="none")),
    ("memory_budget", _set("memory_budget", 0)),
    ("memory_budget", _set("memory_budget", 1.5e9)),
    ("memory_budget", lambda kw: kw.update(memory="fast", memory_budget=1000)),
    ("targets", lambda kw: kw.update(return_log_ratio=True, targets=None)),
    ("reverse_weight", _set("reverse_weight", 1.5)),
    ("reverse_weight", lambda kw: kw.update(estimator="sampled", reverse_weight=0.5)),
]


@pytest.mark.parametrize("name,edit", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_kl_input_names_the_argument(name, edit):
    kwargs = _base()
    edit(kwargs)
    impl = kwargs.pop("impl", "torch")
    with pytest.raises(ValueError, match=name):
        fused_kl_loss(**kwargs, impl=impl)


def test_targets_are_checked_only_on_counted_rows():
    kwargs = _base()
    kwargs["mask"] = torch.tensor([[True, True, False], [True, False, False]])
    kwargs["targets"][~kwargs["mask"]] = -100  # the usual ignore index on padding
    loss = fused_rkl_loss(**kwargs, estimator="sampled", impl="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("edit,name", [
    (lambda a: a.update(targets=None), "targets"),
    (lambda a: a.update(targets=torch.full((2, 3), 99)), "targets"),
    (lambda a: a.update(weight=torch.randn(50, 5)), "weight"),
    (lambda a: a.update(hidden=torch.randn(2, 3, 8).half()), "weight"),
    (lambda a: a.update(temperature=-2.0), "temperature"),
    (lambda a: a.update(reduction="avg"), "reduction"),
    (lambda a: a.update(memory="fast"), "memory"),
])
def test_bad_logprob_input_names_the_argument(edit, name):
    kw = _base()
    args = {"hidden": kw["student_hidden"], "weight": kw["weight"], "targets": kw["targets"]}
    edit(args)
    with pytest.raises(ValueError, match=name):
        fused_token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args, impl="torch")
