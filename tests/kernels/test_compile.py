"""The fused losses under torch.compile: one graph and no break for every option (the loss is one
custom op per call), compiled results and gradients equal to eager, a compiled model training with
the loss."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from opsdl_kernels import fused_kl_loss, fused_rkl_loss, fused_token_logprobs

from .inputs import DEVICE, IMPLS, clear_grads, grads_of, make_inputs
from .reference import reference_kl, rel_err

# option sets of fused_kl_loss: each must compile to one graph
KL_OPTIONS = {
    "plain": {},
    "mask": dict(mask=True),
    "token weights": dict(token_weights=True),
    "mask, token weights, sum": dict(mask=True, token_weights=True, reduction="sum"),
    "reduction none": dict(mask=True, reduction="none"),
    "temperature, softcap": dict(temperature=0.7, softcap=5.0),
    "biases": dict(bias=True, teacher_bias=True),
    "separate teacher head": dict(teacher_hidden=24),
    "forward kl mix": dict(reverse_weight=0.3),
    "sampled": dict(estimator="sampled", mask=True),
    "log ratio": dict(return_log_ratio=True, mask=True),
    "lean": dict(memory="lean", mask=True),
    "fast": dict(memory="fast", mask=True),
}
INPUT_KEYS = ("teacher_hidden", "bias", "teacher_bias", "mask", "token_weights")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own functions from scratch (the loss functions share one code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _split(options: dict) -> tuple[dict, dict]:
    """(make_inputs keywords, fused_kl_loss keywords) of an option set."""
    return ({k: v for k, v in options.items() if k in INPUT_KEYS},
            {k: v for k, v in options.items() if k not in INPUT_KEYS})


def _loss_fn(call: dict, impl: str):
    def loss_fn(inputs: dict) -> torch.Tensor:
        out = fused_kl_loss(**inputs, **call, impl=impl)
        if call.get("return_log_ratio"):
            out = out[0] + 0.0 * out[1].sum()
        return out.sum() if call.get("reduction") == "none" else out
    return loss_fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(KL_OPTIONS))
def test_one_graph_and_no_break_for_every_option(name, impl):
    make, call = _split(KL_OPTIONS[name])
    inputs = make_inputs((3, 5), 16, 300, dtype=torch.float32, seed=80, **make)
    explained = torch._dynamo.explain(_loss_fn(call, impl))(inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_and_no_grad_calls_are_one_graph(impl):
    inputs = make_inputs((3, 5), 16, 300, dtype=torch.float32, seed=81, bias=True)

    def logprobs(h, w, y, b):
        return fused_token_logprobs(h, w, y, bias=b, impl=impl, reduction="mean")

    def scored(h, g, w):
        with torch.no_grad():
            return fused_rkl_loss(h, g, w, impl=impl)

    for fn, args in ((logprobs, (inputs["student_hidden"], inputs["weight"], inputs["targets"], inputs["bias"])),
                     (scored, (inputs["student_hidden"], inputs["teacher_hidden"], inputs["weight"]))):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mask", "mask, token weights, sum", "reduction none", "sampled", "lean",
                                  "biases", "separate teacher head"])
def test_compiled_results_and_gradients_equal_eager(name, impl):
    """fullgraph=True through AOTAutograd (the "aot_eager" backend traces forward and backward as
    inductor does, without generating code): the same numbers as eager, bit for bit."""
    make, call = _split(KL_OPTIONS[name])
    inputs = make_inputs((3, 5), 16, 300, dtype=torch.float32, seed=82, **make)
    runs = []
    for fn in (_loss_fn(call, impl), torch.compile(_loss_fn(call, impl), backend="aot_eager", fullgraph=True)):
        clear_grads(inputs)
        loss = fn(inputs)
        loss.backward()
        runs.append((loss.detach(), *(g for g in grads_of(inputs) if g is not None)))
    for eager, compiled in zip(*runs):
        assert torch.equal(eager, compiled)
    ref_loss, _ = reference_kl(**inputs, **{k: v for k, v in call.items() if k != "memory"},
                               **({"upstream": torch.ones(3, 5)} if call.get("reduction") == "none" else {}))
    assert rel_err(runs[0][0], ref_loss.sum()) < 1e-5


class TinyLM(torch.nn.Module):
    """Embedding, one MLP block and an lm-head: enough to train with the fused loss."""

    def __init__(self, vocab: int = 96, hidden: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.block = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.norm(x + self.block(x))


def _distillation_step(model: TinyLM, student_ids, teacher_ids, targets, mask) -> torch.Tensor:
    with torch.no_grad():
        teacher = model.hidden(teacher_ids)
    return fused_rkl_loss(model.hidden(student_ids), teacher, model.head.weight, targets=targets, mask=mask)


def test_a_small_compiled_model_trains_with_the_loss_as_eager_does():
    """Inductor compiles the model and the loss call together (fullgraph) for five AdamW steps: the
    losses follow eager's step for step (float32, within 1e-4 relative) and the loss goes down."""
    gen = torch.Generator().manual_seed(83)
    student_ids = torch.randint(0, 96, (4, 12), generator=gen)
    teacher_ids = torch.randint(0, 96, (4, 12), generator=gen)
    targets = torch.randint(0, 96, (4, 12), generator=gen)
    mask = torch.rand(4, 12, generator=gen) < 0.7
    trajectories = []
    for compiled in (False, True):
        torch.manual_seed(84)
        model = TinyLM().to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        step = torch.compile(_distillation_step, fullgraph=True) if compiled else _distillation_step
        losses = []
        for _ in range(5):
            loss = step(model, student_ids.to(DEVICE), teacher_ids.to(DEVICE), targets.to(DEVICE), mask.to(DEVICE))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
        trajectories.append(losses)
    eager, compiled = trajectories
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[-1] < eager[0]
