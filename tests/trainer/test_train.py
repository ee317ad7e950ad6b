"""The reference loop: it trains, logs, checkpoints, resumes exactly, and refuses bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opsdl.cli import main
from opsdl.model import load_model
from opsdl.precision import cpu_bf16_units
from opsdl.train import TrainConfig, train

# float32 compute: the same numbers on every CPU (--bf16's default follows the CPU's bf16 units)
TINY = dict(model="tiny:llama", context_tokens=64, num_examples=6, max_new_tokens=5, batch_size=2,
            lr=1e-3, device="cpu", bf16=False)


def _weights(checkpoint) -> dict:
    return load_file(str(checkpoint / "model.safetensors"))


def test_a_few_steps_change_the_parameters(tmp_path):
    initial = {k: v.clone() for k, v in load_model("tiny:llama", seed=0)[0].state_dict().items()}
    summary = train(TrainConfig(**TINY, steps=3, out=str(tmp_path)))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] >= 0 and r["loss"] == r["loss"] for r in log)
    for key in ("kl_estimate", "mean_advantage", "response_length", "tokens_per_s", "peak_memory_mib", "answer_rate"):
        assert key in log[0]
    for record in log:  # every phase of the step timed, within the step's own time
        phases = record["phase_seconds"]
        assert set(phases) == {"rollout", "teacher", "student", "loss", "backward", "optimizer", "push"}
        assert all(phases[k] > 0 for k in ("rollout", "teacher", "student", "loss", "backward", "optimizer"))
        assert sum(phases.values()) <= record["seconds"] and phases["rollout"] == record["rollout_seconds"]
    trained = _weights(tmp_path / "checkpoint-000003")
    changed = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    assert len(changed) > len(trained) // 2
    assert summary["steps_run"] == 3 and (tmp_path / "latest").read_text() == "checkpoint-000003"


@pytest.mark.parametrize("teacher,estimator", [("live", "sampled"), ("ema", "full"), ("frozen", "sampled")])
def test_teacher_modes_and_estimators_run(tmp_path, teacher, estimator):
    summary = train(TrainConfig(**TINY, steps=1, teacher=teacher, estimator=estimator, out=str(tmp_path)))
    assert summary["last_loss"] == summary["last_loss"]  # finite, not NaN
    if teacher == "ema":
        assert (tmp_path / "checkpoint-000001" / "ema" / "model.safetensors").exists()


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    for teacher in ("frozen", "ema"):
        straight, broken = tmp_path / f"straight-{teacher}", tmp_path / f"broken-{teacher}"
        train(TrainConfig(**TINY, steps=3, teacher=teacher, out=str(straight)))
        train(TrainConfig(**TINY, steps=2, teacher=teacher, save_every=1, out=str(broken)))  # "killed" after step 2
        (broken / ".tmp-checkpoint-000003").mkdir()  # a checkpoint write cut short by the kill
        train(TrainConfig(**TINY, steps=3, teacher=teacher, resume="latest", out=str(broken)))
        a, b = _weights(straight / "checkpoint-000003"), _weights(broken / "checkpoint-000003")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), teacher
        steps = [json.loads(line)["step"] for line in (broken / "log.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3]


def test_too_long_examples_error_or_drop(tmp_path):
    with pytest.raises(ValueError, match="exceeds --max-length 100"):
        train(TrainConfig(**TINY, steps=1, max_length=100, out=str(tmp_path)))
    with pytest.raises(ValueError, match="no example fits"):
        train(TrainConfig(**TINY, steps=1, max_length=100, truncate="drop", out=str(tmp_path)))


def test_cli_reports_bad_data_clearly(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": 1, "long_context": "abc", "short_context": "zzz", "question": "q"}\n')
    code = main(["train", "--model", "tiny:llama", "--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert code == 2
    assert "bad.jsonl:1: field 'short_context' does not occur" in capsys.readouterr().err


def test_model_without_lm_head_is_refused():
    from transformers import AutoConfig, AutoModel

    from opsdl.model import lm_head

    with pytest.raises(ValueError, match="no lm-head"):
        lm_head(AutoModel.from_config(AutoConfig.for_model("llama", vocab_size=64, hidden_size=32,
                                                           intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, num_key_value_heads=1)))


def test_smollm2_trains_one_step(tmp_path):
    """The embedded real model through the whole loop at a small length."""
    summary = train(TrainConfig(model="smollm2-135m", context_tokens=128, num_examples=2, max_new_tokens=6,
                                batch_size=1, steps=1, device="cpu", out=str(tmp_path)))
    assert summary["steps_run"] == 1 and summary["last_loss"] == summary["last_loss"]
    reloaded, _ = load_model(str(tmp_path / "checkpoint-000001"))
    assert sum(p.numel() for p in reloaded.parameters()) > 100_000_000


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_one_fused_call_per_micro_batch_on_the_fast_path(tmp_path, monkeypatch, estimator):
    """The loss and the logged log-ratio come from one call, whose gradient was formed in the forward
    (the fast path): no second full forward just to log the single-sample estimate."""
    import opsdl.objective as objective

    calls = []

    def spy(*args, **kwargs):
        loss, log_ratio = loop_fused(*args, **kwargs)
        calls.append((type(loss.grad_fn).__name__, log_ratio.shape, kwargs["targets"].shape))
        return loss, log_ratio

    loop_fused = objective.fused_rkl_loss
    monkeypatch.setattr(objective, "fused_rkl_loss", spy)
    train(TrainConfig(**TINY, steps=2, grad_accum=2, estimator=estimator, out=str(tmp_path)))
    assert len(calls) == 4
    # the fast path's loss is the custom op's own output (the lean path's is a reduction of its values)
    assert all(name.startswith("GeneratedBackwardFor_opsdl_fused_rows") and ratio == rows
               for name, ratio, rows in calls), calls
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["mean_advantage"] == r["mean_advantage"] for r in log)
    if estimator == "sampled":
        assert all(abs(r["kl_estimate"] + r["mean_advantage"]) < 1e-6 for r in log)


@pytest.mark.parametrize("teacher", ["frozen", "live"])
def test_the_teacher_scores_with_its_own_head(tmp_path, monkeypatch, teacher):
    """The logits the loss sees for the teacher, on a fixed input: unchanged bit for bit over the
    steps with a frozen teacher; with a live one they follow the student as it trains."""
    import opsdl.objective as objective
    import opsdl.train as loop
    from opsdl.model import packed_hidden_states
    from opsdl.packing import pack

    fixed = pack([[5, 17, 33, 2, 9, 41]])
    initial, _ = load_model("tiny:llama", seed=0)
    with torch.no_grad():
        head = initial.get_output_embeddings()
        expected_first = packed_hidden_states(initial, fixed) @ head.weight.t()
    seen, hidden = [], []
    real_rows, real_loss = loop.packed_rows, objective.fused_rkl_loss

    def rows_spy(model, *args):
        if not torch.is_grad_enabled():  # the teacher's pass
            hidden.append(packed_hidden_states(model, fixed))
        return real_rows(model, *args)

    def loss_spy(student, teacher_rows, weight, teacher_weight=None, **kwargs):
        w = weight if teacher_weight is None else teacher_weight
        b = kwargs.get("teacher_bias")
        logits = hidden[-1] @ w.detach().t() + (0 if b is None else b)
        seen.append(logits)
        return real_loss(student, teacher_rows, weight, teacher_weight, **kwargs)

    monkeypatch.setattr(loop, "packed_rows", rows_spy)
    monkeypatch.setattr(objective, "fused_rkl_loss", loss_spy)
    train(TrainConfig(**TINY, steps=4, teacher=teacher, out=str(tmp_path)))
    assert len(seen) == 4 and torch.equal(seen[0], expected_first)
    if teacher == "frozen":
        assert all(torch.equal(s, expected_first) for s in seen[1:])
    else:
        assert all(not torch.allclose(s, expected_first) for s in seen[1:])


def test_learning_rate_schedules_follow_the_hugging_face_shapes(tmp_path):
    import math

    from opsdl.steps import learning_rate

    def rates(**kw):
        cfg = TrainConfig(lr=1.0, steps=10, **kw)
        return [learning_rate(cfg, s) for s in range(10)]

    assert rates() == [1.0] * 10
    assert rates(warmup_steps=4)[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rates(lr_scheduler="linear", warmup_steps=2) == [0.0, 0.5] + [1 - k / 8 for k in range(8)]
    cosine = rates(lr_scheduler="cosine")
    assert all(abs(c - 0.5 * (1 + math.cos(math.pi * s / 10))) < 1e-12 for s, c in enumerate(cosine))
    train(TrainConfig(**TINY, steps=3, warmup_steps=1, lr_scheduler="linear", out=str(tmp_path)))
    log = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [0.0, TINY["lr"], TINY["lr"] / 2]


def test_save_total_limit_keeps_the_newest(tmp_path):
    train(TrainConfig(**TINY, steps=3, save_every=1, save_total_limit=2, out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    assert (tmp_path / "latest").read_text() == "checkpoint-000003"


def test_overwrite_and_resume_from_a_given_checkpoint_rewind_the_log(tmp_path):
    train(TrainConfig(**TINY, steps=3, save_every=1, out=str(tmp_path)))
    first = _weights(tmp_path / "checkpoint-000003")
    # from checkpoint 1: the log lines of steps 2 and 3 are dropped and written again
    train(TrainConfig(**TINY, steps=3, save_every=1, resume=str(tmp_path / "checkpoint-000001"), out=str(tmp_path)))
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    again = _weights(tmp_path / "checkpoint-000003")
    assert all(torch.equal(first[k], again[k]) for k in first)
    (tmp_path / "notes.txt").write_text("mine")
    train(TrainConfig(**TINY, steps=1, overwrite_output_dir=True, out=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "latest", "log.jsonl", "notes.txt"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


def test_resume_without_a_checkpoint_starts_over_with_a_clean_log(tmp_path):
    """A run killed before its first checkpoint leaves log lines behind; --resume finds no checkpoint,
    starts from step 0 and writes each step's line once (it appended to the old ones before)."""
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    train(TrainConfig(**TINY, steps=2, resume="latest", out=str(tmp_path)))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] != 9.0 for r in log)


def test_a_separate_teacher_model_scores_with_its_own_weights(tmp_path, monkeypatch):
    import opsdl.objective as objective

    teacher_dir = tmp_path / "teacher"
    bigger, tokenizer = load_model("tiny:llama", seed=7)
    bigger.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    seen = []
    real = objective.fused_rkl_loss

    def spy(student, teacher_rows, weight, teacher_weight=None, **kwargs):
        seen.append(teacher_weight.detach().clone())
        return real(student, teacher_rows, weight, teacher_weight, **kwargs)

    monkeypatch.setattr(objective, "fused_rkl_loss", spy)
    train(TrainConfig(**TINY, steps=2, teacher_model=str(teacher_dir), out=str(tmp_path / "run")))
    assert len(seen) == 2 and all(torch.equal(w, bigger.lm_head.weight) for w in seen)
    other = tmp_path / "other-vocab"
    from transformers import AutoModelForCausalLM

    from opsdl.model import tiny_config

    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(other)  # 512 entries
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="--teacher-model .*vocabulary has 512 entries"):
        train(TrainConfig(**TINY, steps=1, teacher_model=str(other), out=str(tmp_path / "run2")))


def test_bf16_compute_over_float32_master_weights(tmp_path, monkeypatch):
    import opsdl.objective as objective

    if not cpu_bf16_units():
        pytest.skip("this CPU has no bf16 units: --bf16 would run bf16 products in reference loops")
    calls, casts = [], []
    real_loss, real_copy = objective.fused_rkl_loss, objective._leaf_copy

    def spy(student, teacher_rows, weight, teacher_weight=None, **kwargs):
        calls.append((student.dtype, teacher_rows.dtype, weight.dtype, teacher_weight.dtype, kwargs["temperature"]))
        return real_loss(student, teacher_rows, weight, teacher_weight, **kwargs)

    def counted_copy(master, dtype):
        casts.append(None if master is None else tuple(master.shape))
        return real_copy(master, dtype)

    monkeypatch.setattr(objective, "fused_rkl_loss", spy)
    monkeypatch.setattr(objective, "_leaf_copy", counted_copy)
    cfg = {**TINY, "bf16": True}
    train(TrainConfig(**cfg, steps=2, grad_accum=2, teacher="ema", temperature=0.8, out=str(tmp_path)))
    # four loss calls (2 steps x 2 micro-batches), all in bf16, at the sampling temperature
    assert calls == [(torch.bfloat16,) * 4 + (0.8,)] * 4
    # the student's head cast once per step, not once per micro-batch (its bias: None)
    weight_casts = [c for c in casts if c is not None]
    assert len(weight_casts) == 2
    checkpoint = tmp_path / "checkpoint-000002"
    assert {v.dtype for v in _weights(checkpoint).values()} == {torch.float32}
    assert {v.dtype for v in load_file(str(checkpoint / "ema" / "model.safetensors")).values()} == {torch.float32}
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}


@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])
def test_16bit_master_weights_are_refused_naming_bf16(tmp_path, dtype):
    with pytest.raises(ValueError, match=f"--dtype {dtype}: training needs float32 master weights.*--bf16"):
        train(TrainConfig(**TINY, steps=1, dtype=dtype, out=str(tmp_path)))


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(top_p=0.9)])
def test_off_policy_rollouts_are_refused_unless_asked_for(tmp_path, sampling):
    with pytest.raises(ValueError, match="not be drawn from the distribution the loss scores.*--off-policy"):
        train(TrainConfig(**TINY, steps=1, out=str(tmp_path), **sampling))
    train(TrainConfig(**TINY, steps=1, off_policy=True, out=str(tmp_path / "ok"), **sampling))


def test_output_files_respect_the_umask(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        train(TrainConfig(**TINY, steps=1, out=str(tmp_path)))
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"model.safetensors", "trainer_state.pt", "latest", "log.jsonl"} <= {p.name for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


def test_trust_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = load_model("tiny:llama", seed=0)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    asked = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            asked.append(kwargs.get("trust_remote_code"))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tmp_path / "m"))
    load_model(str(tmp_path / "m"), trust_remote_code=True)
    assert asked == [False, False, True, True]


def test_a_teacher_model_with_another_tokenizer_is_refused(tmp_path):
    model, tokenizer = load_model("tiny:llama", seed=3)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.add_tokens(["<an-extra-token>"])  # same vocabulary size in the model, another tokenizer
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="--teacher-model .*its tokenizer differs"):
        train(TrainConfig(**TINY, steps=1, teacher_model=str(tmp_path / "teacher"), out=str(tmp_path / "run")))


def test_no_save_optimizer_leaves_adamw_out_and_a_resume_says_so(tmp_path, capsys):
    train(TrainConfig(**TINY, steps=2, save_every=1, save_optimizer=False, out=str(tmp_path)))
    state = torch.load(tmp_path / "checkpoint-000001" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"] is None and state["step"] == 1
    train(TrainConfig(**TINY, steps=2, save_optimizer=False, resume=str(tmp_path / "checkpoint-000001"),
                      out=str(tmp_path)))
    assert "holds no optimizer state (--no-save-optimizer); AdamW starts afresh" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["sft", "opsdl"])
def test_the_loss_is_the_mean_over_the_steps_tokens_whatever_the_micro_batches(tmp_path, monkeypatch, objective):
    """grad-accum 1 x batch 4 and grad-accum 4 x batch 1 give the same gradient (fp32 rounding): every
    response token weighs 1 / (the step's response tokens), so a short response weighs no more than
    a long one. SFT trains on gold answers of 1 to 12 words; OPSDL on responses of 1 to 12 tokens."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    lines = [json.dumps({"id": i, "long_context": f"filler text. the code is {' '.join(words[:n])}. more filler.",
                         "short_context": f"the code is {' '.join(words[:n])}.", "question": "What is the code?",
                         "answer": " ".join(words[:n])}) for i, n in enumerate((1, 12, 3, 7))]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def record(parameters, max_norm):
        parameters = list(parameters)
        grads.append([p.grad.detach().clone() for p in parameters])
        return real_clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    if objective == "opsdl":  # responses of 1 to 12 tokens, each prompt's the same in both runs
        import opsdl.rollout_engines as engines
        from opsdl.rollout import Rollout

        def rollouts(model, tokenizer, prompts, **options):
            return [Rollout(i, [(7 * len(p) + k) % 60 + 3 for k in range(len(p) % 12 + 1)], True)
                    for i, p in enumerate(prompts)]

        monkeypatch.setattr(engines, "sample", rollouts)
    base = dict(TINY, data=str(data), steps=1, objective=objective, max_new_tokens=12)
    logs = []
    for batch, accum in ((4, 1), (1, 4)):
        out = tmp_path / f"b{batch}x{accum}"
        train(TrainConfig(**{**base, "batch_size": batch, "grad_accum": accum, "out": str(out)}))
        logs.append(json.loads((out / "log.jsonl").read_text().splitlines()[0]))
    # fp32 sums over 4 packed sequences or 1: the loss (a KL near 1e-4, a difference of log-probs of
    # order 10) agrees to 20 ulps of those log-probs
    assert abs(logs[0]["loss"] - logs[1]["loss"]) <= 20 * 10 * 2**-24, logs
    one, four = grads
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(one, four))
    print(f"worst relative gradient difference: {worst:.2e}")
    assert worst < 1e-4, worst  # fp32: packing 4 sequences or 1 changes only the summation order
    lengths = {logs[0]["response_length"], logs[1]["response_length"]}
    assert len(lengths) == 1 and lengths.pop() > 3  # the same responses, of several lengths


def test_a_saved_tokenizer_serves_random_weight_models(tmp_path):
    """--tokenizer: where the embedded package is absent (GPU images), tiny:/random: models take a
    saved tokenizer folder; it is refused for models that bring their own, and when it holds none."""
    _, tokenizer = load_model("tiny:llama")
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    train(TrainConfig(**TINY, steps=1, tokenizer=str(folder), out=str(tmp_path / "run")))
    assert (tmp_path / "run" / "checkpoint-000001" / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="--tokenizer .*: only for tiny:/random: models"):
        train(TrainConfig(**{**TINY, "model": "smollm2-135m"}, steps=1, tokenizer=str(folder), out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="--tokenizer .*: expected a folder holding a saved tokenizer"):
        train(TrainConfig(**TINY, steps=1, tokenizer=str(tmp_path), out=str(tmp_path / "b")))
