"""Student and teacher rows align one to one with the response tokens."""
from __future__ import annotations

import torch

from opsdl.model import lm_head, packed_hidden_states
from opsdl.packing import own_attention, pack
from opsdl.objective import packed_rows, response_rows
from opsdl_kernels import fused_rkl_loss, fused_token_logprobs


def test_response_rows_formula():
    # sequence 0: prompt 3, response 2 at offset 0; sequence 1: prompt 4, response 3 at offset 5
    assert response_rows([3, 4], [2, 3], [0, 5]).tolist() == [2, 3, 8, 9, 10]


def test_rows_score_the_response_like_the_models_own_logits(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (9, 4)]
    responses = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (5, 1)]
    head = lm_head(model)
    with torch.no_grad():
        rows = packed_rows(model, prompts, responses, "cpu")
        ours = fused_token_logprobs(rows, head.weight, torch.tensor([t for r in responses for t in r]))
        expected = []
        for p, r in zip(prompts, responses):
            with own_attention(model):  # the model as transformers runs it, one sequence at a time
                logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expected += [logp[len(p) - 1 + k, t] for k, t in enumerate(r)]
    assert torch.allclose(ours, torch.stack(expected), atol=1e-5)


def test_identical_prompts_give_zero_kl_and_zero_gradient_and_a_shift_is_caught(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (12, 7)]
    responses = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (6, 4)]
    targets = torch.tensor([t for r in responses for t in r])
    head = lm_head(model)
    model.zero_grad()
    with torch.no_grad():
        teacher = packed_rows(model, prompts, responses, "cpu")
    student = packed_rows(model, prompts, responses, "cpu")
    for estimator in ("full", "sampled"):
        loss = fused_rkl_loss(student, teacher, head.weight, targets=targets, estimator=estimator)
        loss.backward(retain_graph=True)
        assert loss.item() == 0.0
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    # the same check fails at once if the teacher rows are off by one (state P + k instead of P - 1 + k)
    packed = pack([p + r for p, r in zip(prompts, responses)])
    with torch.no_grad():
        hidden = packed_hidden_states(model, packed)
    starts = packed.cu_seqlens[:-1].tolist()
    assert torch.equal(hidden[response_rows([len(p) for p in prompts], [len(r) for r in responses], starts)], teacher)
    off_by_one = hidden[response_rows([len(p) + 1 for p in prompts], [len(r) for r in responses], starts)]
    assert fused_rkl_loss(student.detach(), off_by_one, head.weight).item() > 1e-3
