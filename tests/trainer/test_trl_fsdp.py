"""OPSDLTrainer (TRL) under accelerate's FSDP2: two CPU ranks (gloo) against one process.

One ``accelerate launch --use_fsdp --fsdp_version 2`` of two ranks (``trl_rank_worker.py``) trains
two steps with the live teacher, then two with the base teacher; the single-process references
run here.

Why the fused loss may read the lm-head after the forward under FSDP2: accelerate (1.16)'s
``fsdp2_prepare_model`` shards the final norm and the lm-head as one FSDP unit of their own with
``reshard_after_forward=False`` (whatever ``fsdp_reshard_after_forward`` says), so after the
model's forward ``lm_head.weight`` is the whole, unsharded parameter; the loss's gradient lands in
its ``.grad``, which FSDP reduce-scatters at the end of the backward with the unit's others. (Were
the unit resharded after the forward, the loss would read a ``DTensor`` shard of the head, which
the kernels take for a vocabulary-parallel shard of rows that are the same on every rank: a wrong
loss, then a crash in the backward. The worker records what the loss read; the first test checks it.)
The base teacher is OPSDLTrainer's own copy of the initial weights, sharded like the student
(TRL's ``prepare_fsdp``); its head, a constant, is gathered whole for the loss (``whole_head``).
An EMA teacher is such a copy too, which TRL's callback averages shard by shard after each step;
the reference gives its own teacher the averaged weights by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from tests.trainer.trl_replay import (ROWS, check_first_step, free_port, launch, load,  # noqa: E402
                                      reference_trainer, relative_errors, replay_step)

TEACHERS = ["live", "base", "ema"]
# a rate large enough that step 1 moves the weights (and the base teacher then differs from the live
# one at step 2); no clipping (it would rescale an error away); the EMA teacher halfway to the student
OVERRIDES = {"learning_rate": 1e-3, "max_grad_norm": 0.0, "teacher_update_rate": 0.5}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One ``accelerate launch`` with FSDP2 on two CPU processes: two steps per teacher."""
    root = tmp_path_factory.mktemp("trl_fsdp")
    launch(["accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())], root, TEACHERS, OVERRIDES)
    return root


@pytest.mark.parametrize("teacher", TEACHERS)
def test_it_is_fsdp2_and_the_loss_reads_the_whole_lm_head(launched, teacher):
    ranks, tensors = load(launched, teacher)
    for rank, result in enumerate(ranks):
        assert (result["rank"], result["world_size"], result["backend"]) == (rank, 2, "gloo")
        assert result["distributed_type"] == "DistributedType.FSDP" and result["fsdp_version"] == 2
        # sharded: every parameter and gradient a DTensor, the model an FSDPModule
        assert result["fsdp_module"] and result["param_types"] == ["DTensor"] and result["grad_types"] == ["DTensor"]
        assert result["teacher_is_model"] == (teacher == "live")
        assert len(result["losses"]) == 2 and all(math.isfinite(c["loss"]) and c["loss"] > 0 for c in result["losses"])
        for call in result["losses"]:
            assert call["model"].startswith("FSDP")
            # what compute_loss read after the forwards: the student's whole head, not a DTensor shard
            vocab_by_hidden = call["head"]["shape"]
            assert call["head"] == {"dtensor": False, "shape": vocab_by_hidden, "local_shape": vocab_by_hidden}
            if teacher == "live":
                assert call["teacher_head"] == call["head"]
            else:  # the copied teacher is sharded like the student; the loss gathers its head (whole_head)
                half = [vocab_by_hidden[0] // 2, vocab_by_hidden[1]]
                assert call["teacher_head"] == {"dtensor": True, "shape": vocab_by_hidden, "local_shape": half}
    seen = [q for result in ranks for q in result["batches"][0]["questions"]]
    assert sorted(seen) == sorted(row["question"] for row in ROWS)  # step 1: the ranks split the 4 rows
    # the ranks hold the same whole tensors
    for what, (a, b) in tensors.items():
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), what
    # TRL logs the mean over ranks of their losses
    logged = [h["loss"] for h in ranks[0]["log_history"] if "loss" in h]
    for step, value in enumerate(logged):
        assert value == pytest.approx(sum(r["losses"][step]["loss"] for r in ranks) / 2, rel=1e-5)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_fsdp2_gradients_are_the_mean_of_the_ranks_batches_in_one_process(launched, tmp_path, teacher):
    """Per step, one process replays each rank's batch (as the worker recorded it) from the weights
    FSDP had before that step, with the trainer's own ``_prepare_training_batch`` and
    ``compute_loss`` (the base teacher: the initial weights; the live one: the same weights; the
    EMA one: the initial weights at step 1, then their average with step 1's at the given rate).
    FSDP's gradients (reduce-scattered, gathered whole) must be the mean of the two per-batch
    gradients, as DDP's are (tests/trainer/test_trl_launch.py): measured bit for bit, bound
    ||g_fsdp - g_ref|| / ||g_ref|| < 1e-4 per tensor (one rank's gradient alone is ~0.8 from the
    mean); step 1's weights within 1e-3 * lr of the reference's AdamW stepped with that mean."""
    ranks, tensors = load(launched, teacher)
    initial = tensors["initial"][0]
    reference = reference_trainer(tmp_path, initial, teacher_model_kind=teacher, max_steps=2, **OVERRIDES)
    before = initial
    for step in (1, 2):
        with torch.no_grad():
            for name, param in reference.model.named_parameters():
                param.copy_(before[name])
        if teacher == "ema" and step == 2:  # TRL's update after step 1: (1 - rate) * teacher + rate * student
            rate = OVERRIDES["teacher_update_rate"]
            with torch.no_grad():
                for name, param in reference.teacher_model.named_parameters():
                    param.copy_((1 - rate) * initial[name] + rate * tensors["step1"][0][name])
        mean = replay_step(reference, ranks, step)
        got = tensors[f"grads{step}"][0]
        assert got.keys() == mean.keys()
        errors = relative_errors(got, mean)
        assert max(errors.values()) < 1e-4, (step, sorted(errors.items(), key=lambda kv: -kv[1])[:3])
        if step == 1:
            check_first_step(reference, mean, initial, tensors["step1"][0])
        before = tensors[f"step{step}"][0]


def test_the_teachers_differ_at_step_two(launched):
    """Step 1 starts every run from the same weights with the same teacher; at step 2 the base
    teacher is the initial weights, the live one the updated student and the EMA one halfway: the
    losses must differ (measured, per rank: live 0.28 and 0.32 of base, EMA 0.28 and 0.36 of base,
    0.9% and 14% from live), so the losses the gradient test replays (to 1e-5) tell them apart."""
    live, _ = load(launched, "live")
    base, _ = load(launched, "base")
    ema, _ = load(launched, "ema")
    for a, b, c in zip(live, base, ema):
        assert a["losses"][0]["loss"] == pytest.approx(b["losses"][0]["loss"], rel=1e-6)
        assert c["losses"][0]["loss"] == pytest.approx(b["losses"][0]["loss"], rel=1e-6)
        assert abs(a["losses"][1]["loss"] - b["losses"][1]["loss"]) > 0.2 * b["losses"][1]["loss"]
        assert abs(c["losses"][1]["loss"] - b["losses"][1]["loss"]) > 0.2 * b["losses"][1]["loss"]
        assert abs(c["losses"][1]["loss"] - a["losses"][1]["loss"]) > 1e-3 * a["losses"][1]["loss"]
