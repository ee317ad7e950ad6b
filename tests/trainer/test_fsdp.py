"""Training on many ranks (torchrun + FSDP2) against one process, on the CPU with gloo.

One torchrun launch of two ranks (``fsdp_worker.py``) computes the sharded gradients and runs the
sharded trainings; the single-process references run here. With greedy rollouts and the step's
prompts split over the ranks, two ranks with batch b must train exactly as one process with 2b.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opsdl.cli import main
from opsdl.model import load_model, tiny_config
from opsdl.options import TrainConfig
from opsdl.train import train

WORKER = Path(__file__).with_name("fsdp_worker.py")
MODELS = [("llama", True), ("llama", False), ("gemma2", True), ("gemma2", False)]
# other ways through the loop, each against one process (on tiny Llama, tied)
VARIANTS = {"sft": dict(objective="sft"), "live teacher, 2 micro-batches": dict(teacher="live", grad_accum=2),
            "per-layer rollouts": dict(rollout_gather="per-layer"), "sampled estimator": dict(estimator="sampled")}
# large enough a rate that two steps move every trained weight by ~1e-3: a 1e-5 agreement is a real one
RUN = dict(device="cpu", steps=2, context_tokens=64, num_examples=8, max_new_tokens=6, temperature=0.0, off_policy=True,
           bf16=False, lr=1e-3,
           impl="torch", seed=3)


def torchrun(ranks: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Model folders (tied and untied tiny Llama and Gemma-2), and one two-rank launch of every job."""
    root = tmp_path_factory.mktemp("fsdp")
    tokenizer = load_model("tiny:llama")[1]
    folders = {}
    for family, tied in MODELS:
        torch.manual_seed(0)
        config = tiny_config(family, vocab_size=len(tokenizer), tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_config(config)
        folder = root / f"{family}-{'tied' if tied else 'untied'}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[(family, tied)] = str(folder)
    train_jobs = [dict(RUN, model=folder, batch_size=2, out=str(root / "sharded" / Path(folder).name))
                  for folder in folders.values()]
    llama = folders[("llama", True)]
    train_jobs += [dict(RUN, model=llama, batch_size=2, out=str(root / "variants" / name), **options)
                   for name, options in VARIANTS.items()]
    train_jobs += [dict(RUN, model=llama, batch_size=2, steps=3, teacher="ema", out=str(root / "uninterrupted")),
                   dict(RUN, model=llama, batch_size=2, teacher="ema", out=str(root / "stopped")),
                   dict(RUN, model=folders[("gemma2", False)], batch_size=2, bf16=True,
                        out=str(root / "bf16"))]
    job = {"gradients": list(folders.values()), "grad_out": str(root / "gradients.json"), "train": train_jobs}
    (root / "job.json").write_text(json.dumps(job))
    done = torchrun(2, [str(WORKER), str(root / "job.json")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, folders, done


@pytest.mark.parametrize("memory", ["fast", "lean"])
@pytest.mark.parametrize("family,tied", MODELS)
def test_sharded_gradients_equal_one_process(launched, family, tied, memory):
    root, folders, _ = launched
    errors = json.loads((root / "gradients.json").read_text())[f"{folders[(family, tied)]} {memory}"]
    assert errors["tied"] == tied and errors["loss"] > 0
    assert errors["lm_head"] < 1e-5, errors
    assert errors["worst"] < 1e-5, errors


def weights(checkpoint: Path) -> dict:
    return load_file(str(checkpoint / "model.safetensors"))


@pytest.mark.parametrize("family,tied", MODELS)
def test_two_ranks_train_as_one_process_with_twice_the_batch(launched, tmp_path, family, tied):
    root, folders, _ = launched
    folder = folders[(family, tied)]
    single = train(TrainConfig(**RUN, model=folder, batch_size=4, out=str(tmp_path / "single")))
    sharded = root / "sharded" / Path(folder).name / "checkpoint-000002"
    got, want = weights(sharded), weights(Path(single["checkpoint"]))
    initial = weights_of(folder)
    assert sorted(got) == sorted(want)
    moved = max(float((want[k] - initial[k]).abs().max()) for k in want)
    assert moved > 5e-4  # the steps changed the weights, so agreeing below means something
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5
    log = [json.loads(line) for line in (sharded.parent / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for mine, theirs in zip(log, single_log):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["response_length"] == theirs["response_length"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_way_through_the_loop_trains_as_one_process(launched, tmp_path, variant):
    root, folders, _ = launched
    single = train(TrainConfig(**{**RUN, **VARIANTS[variant]}, model=folders[("llama", True)], batch_size=4,
                               out=str(tmp_path / "single")))
    got, want = weights(root / "variants" / variant / "checkpoint-000002"), weights(Path(single["checkpoint"]))
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5


def test_resume_on_one_rank_continues_a_two_rank_run(launched):
    """Stopped after step 2 on two ranks, resumed on one rank with the whole batch: step 3 as the
    uninterrupted two-rank run made it (weights, optimizer and EMA teacher resharded by DCP)."""
    root, folders, _ = launched
    stopped = root / "stopped"
    assert (stopped / "checkpoint-000002" / "shards").is_dir()
    args = ["-m", "opsdl", "train", "--model", folders[("llama", True)], "--out", str(stopped), "--resume",
            "--steps", "3", "--batch-size", "4", "--teacher", "ema"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items() if k != "steps" and not isinstance(v, bool)]
    args += [f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in RUN.items() if isinstance(v, bool)]
    done = torchrun(1, args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got, want = weights(stopped / "checkpoint-000003"), weights(root / "uninterrupted" / "checkpoint-000003")
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 1e-5
    log = [json.loads(line)["step"] for line in (stopped / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]


def test_the_exported_model_loads_and_generates_in_plain_transformers(launched):
    root, folders, _ = launched
    checkpoint = root / "sharded" / "gemma2-tied" / "checkpoint-000002"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_a_single_process_run_refuses_a_sharded_checkpoint(launched, tmp_path):
    root, folders, _ = launched
    with pytest.raises(ValueError, match="sharded checkpoint of a torchrun run"):
        train(TrainConfig(**RUN, model=folders[("llama", True)], out=str(tmp_path / "x"),
                          resume=str(root / "stopped" / "checkpoint-000002")))


def test_logs_come_from_rank_zero_only(launched):
    root, _, done = launched
    runs = len(json.loads((root / "job.json").read_text())["train"])
    assert done.stdout.count('"steps_run"') == runs  # one summary per run, not one per rank
    assert done.stdout.count("opsdl train: 2 ranks (cpu)") == runs


def test_a_failing_rank_stops_the_run_with_its_error(tmp_path):
    job = {"fail_on_rank": 1, "train": [dict(RUN, model="tiny:llama", batch_size=1, out=str(tmp_path / "run"))]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = torchrun(2, [str(WORKER), str(tmp_path / "job.json")], timeout=300)
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stdout + done.stderr


def test_bf16_compute_over_float32_shards_trains_and_exports_float32(launched):
    """--bf16 under torchrun: FSDP2 gathers bf16 weights (the model and the fused loss compute in
    bf16) and reduces gradients in fp32 into float32 shards, as on CUDA."""
    root, folders, _ = launched
    log = [json.loads(line) for line in (root / "bf16" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)
    assert json.loads((root / "bf16" / "loss_dtypes.json").read_text()) == ["torch.bfloat16 torch.bfloat16"]
    assert json.loads((root / "sharded" / "gemma2-untied" / "loss_dtypes.json").read_text()) == [
        "torch.float32 torch.float32"]
    got, initial = weights(root / "bf16" / "checkpoint-000002"), weights_of(folders[("gemma2", False)])
    assert all(t.dtype == torch.float32 for t in got.values())
    assert max(float((got[k] - initial[k]).abs().max()) for k in got) > 5e-4


def weights_of(folder: str) -> dict:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_an_intermediate_sharded_checkpoint_is_not_taken_for_a_model(launched, tmp_path):
    """Only the last checkpoint of a torchrun run holds the consolidated model: the others are
    refused as models by name, before anything loads."""
    root, _, _ = launched
    intermediate = tmp_path / "checkpoint-000001"
    shutil.copytree(root / "stopped" / "checkpoint-000002", intermediate)
    for weights_file in intermediate.glob("*.safetensors"):
        weights_file.unlink()
    with pytest.raises(ValueError, match="sharded checkpoint of a torchrun run, without the consolidated model"):
        load_model(str(intermediate))


@pytest.mark.parametrize("run", ["stopped", "sharded/gemma2-untied"])
def test_opsdl_export_consolidates_any_sharded_checkpoint_in_one_process(launched, tmp_path, run):
    """`opsdl export` on a checkpoint's shards alone gives the weights the run consolidated itself
    (tied Llama with an EMA teacher beside it, untied Gemma-2)."""
    root, _, _ = launched
    checkpoint = tmp_path / "checkpoint-000002"
    shutil.copytree(root / run / "checkpoint-000002", checkpoint)
    consolidated = weights(checkpoint)
    for weights_file in checkpoint.glob("*.safetensors"):
        weights_file.unlink()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")]) == 0
    exported = weights(tmp_path / "export")
    assert sorted(exported) == sorted(consolidated)
    assert all(torch.equal(exported[k], consolidated[k]) for k in consolidated)
    model = load_model(str(tmp_path / "export"))[0]  # and it loads as any model folder
    assert model.config.tie_word_embeddings == (run == "stopped")


def test_opsdl_export_refuses_what_is_not_a_sharded_checkpoint(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "expected a checkpoint of a torchrun run" in capsys.readouterr().err
