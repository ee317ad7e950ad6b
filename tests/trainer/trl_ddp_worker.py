"""The rank side of tests/trainer/test_trl_launch.py, started there with ``torchrun`` (not a test module).

    torchrun --standalone --nproc-per-node 2 tests/trainer/trl_ddp_worker.py JOB.json

JOB.json: {"rows": [dataset rows], "out": folder, "config": OPSDLConfig overrides}. Every rank
trains ``OPSDLTrainer("tiny:llama")`` under accelerate's DDP (gloo on the CPU) and writes, in
``out``: ``rank{r}.json`` (what it trained on: the questions and rollouts of each batch it
prepared, the losses its ``compute_loss`` returned, TRL's log history, weight digests), and
``rank{r}-{what}.pt`` state dicts: ``initial`` (the weights DDP started from, at
``on_train_begin``), ``grads`` (the gradients the first optimizer step applies, rank-averaged by
DDP, at ``on_pre_optimizer_step``), ``step1`` (the weights after that step) and ``final``.
"""
from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fsdp_worker import destroy_group  # noqa: E402  (this folder: the script's own)
from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer  # noqa: E402


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def digest(model: torch.nn.Module) -> list[float]:
    """Per parameter, sum and sum of squares in float64: equal weights give equal digests."""
    return [[float(p.detach().double().sum()), float(p.detach().double().square().sum())]
            for p in model.parameters()]


class Recorder(TrainerCallback):
    def __init__(self, out: Path, rank: int):
        self.out, self.rank = out, rank

    def save(self, what: str, tensors: dict) -> None:
        torch.save(tensors, self.out / f"rank{self.rank}-{what}.pt")

    def on_train_begin(self, args, state_, control, model=None, **kwargs):
        self.save("initial", state(model))

    def on_pre_optimizer_step(self, args, state_, control, model=None, **kwargs):
        if state_.global_step == 0:  # the first optimizer step: the gradients DDP all-reduced
            self.save("grads", {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                if p.grad is not None})

    def on_optimizer_step(self, args, state_, control, model=None, **kwargs):
        if state_.global_step == 0:
            self.save("step1", state(model))


def main(job_file: str) -> None:
    train_and_record(json.loads(Path(job_file).read_text()))
    gc.collect()  # the trainer, gone with train_and_record's frame: its DDP module held the group
    destroy_group()  # and check that its gloo threads ended (fsdp_worker.py says why)


def train_and_record(job: dict) -> None:
    out = Path(job["out"])
    settings = dict(output_dir=str(out / "run"), per_device_train_batch_size=2, max_completion_length=8, max_steps=2,
                    report_to=[], use_cpu=True, generation_kwargs={"do_sample": False}, seed=0, fused_impl="torch",
                    logging_steps=1, shuffle_dataset=False, bf16=False, lr_scheduler_type="constant",
                    save_strategy="no")
    args = OPSDLConfig(**{**settings, **job.get("config", {})})
    rank = args.process_index
    recorder = Recorder(out, rank)
    trainer = OPSDLTrainer("tiny:llama", args=args, train_dataset=Dataset.from_list(job["rows"]), callbacks=[recorder])

    batches, losses = [], []
    prepare, compute_loss = trainer._prepare_training_batch, trainer.compute_loss

    def prepare_spy(inputs):
        batch = prepare(inputs)
        batches.append({"questions": [e["question"] for e in inputs],
                        "completions": [ids[m.bool()].tolist() for ids, m in
                                        zip(batch["completion_ids"], batch["completion_mask"])]})
        return batch

    def loss_spy(model, inputs, *a, **k):
        loss = compute_loss(model, inputs, *a, **k)
        losses.append({"loss": float(loss.detach()), "ddp": type(model).__name__,
                       "step_rows": inputs.get("step_rows")})
        return loss

    trainer._prepare_training_batch, trainer.compute_loss = prepare_spy, loss_spy
    trainer.train()
    recorder.save("final", state(trainer.model))
    result = {"rank": rank, "world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
              "backend": dist.get_backend() if dist.is_initialized() else None,
              "batches": batches, "losses": losses, "log_history": trainer.state.log_history,
              "digest": digest(trainer.model)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
