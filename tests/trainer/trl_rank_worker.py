"""The rank side of tests/trainer/test_trl_launch.py and tests/trainer/test_trl_fsdp.py (not a test
module), started there by a launcher on two CPU ranks (gloo):

    torchrun --standalone --nproc-per-node 2 tests/trainer/trl_rank_worker.py JOB.json           (DDP)
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 ... trl_rank_worker.py JOB.json
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 ... trl_rank_worker.py JOB.json

JOB.json: {"rows": [dataset rows], "out": folder, "teachers": ["live", "base", ...], "config": OPSDLConfig
overrides}. For each teacher kind in turn, every rank trains ``OPSDLTrainer("tiny:llama")`` and
writes, in ``out/<teacher>``: ``rank{r}.json`` (what it trained on: the questions and rollouts of
each batch it prepared, the losses its ``compute_loss`` returned, what the lm-heads it read looked
like, the distributed setup) and ``rank{r}-{what}.pt`` state dicts of whole tensors
(``DTensor.full_tensor()`` under FSDP2): ``initial`` (at ``on_train_begin``, after wrapping),
``grads{k}`` (the gradients optimizer step k applies, reduced over the ranks, at
``on_pre_optimizer_step``; DeepSpeed steps inside the backward and keeps its gradients in its own
partitions: no file) and ``step{k}`` (the weights after step k).

Accelerate 1.16 runs FSDP on accelerators only: on the CPU, ``accelerate launch --use_fsdp`` still
sets ``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables, and ``Accelerator`` builds the FSDP
plugin from them, but ``AcceleratorState`` switches to FSDP only for MULTI_GPU / XPU / NPU / ...
and silently stays MULTI_CPU (DDP). ``cpu_fsdp`` below makes it take the plugin on the CPU as it
would on a GPU; the rest of the FSDP2 path (``fsdp2_prepare_model``, the sharded optimizer, the
gradient reduce-scatter) is accelerate's and torch's own, on gloo.
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
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fsdp_worker import destroy_group  # noqa: E402  (this folder: the script's own)
from trl_replay import config  # noqa: E402
from opsdl.integrations.trl import OPSDLTrainer  # noqa: E402
from opsdl.integrations.trl.hidden import output_head  # noqa: E402


def cpu_fsdp() -> None:
    """Let ``AcceleratorState`` take the FSDP plugin on the CPU (see the module docstring)."""
    init = AcceleratorState.__init__

    def init_with_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # as accelerate's own first initialization does: later `AcceleratorState()` calls (the
            # optimizer wrapper makes one) copy PartialState's distributed type back over this one
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_cpu_fsdp


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: whole(p) for name, p in model.named_parameters()}


def describe(tensor: torch.Tensor) -> dict:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return {"dtensor": isinstance(tensor, DTensor), "shape": list(tensor.shape), "local_shape": list(local.shape)}


class Recorder(TrainerCallback):
    def __init__(self, out: Path, rank: int):
        self.out, self.rank, self.info = out, rank, {}

    def save(self, what: str, tensors: dict) -> None:
        torch.save(tensors, self.out / f"rank{self.rank}-{what}.pt")

    def on_train_begin(self, args, state_, control, model=None, **kwargs):
        self.info.update(prepared=type(model).__name__, fsdp_module=isinstance(model, FSDPModule),
                         param_types=sorted({type(p).__name__ for p in model.parameters()}))
        self.save("initial", state(model))

    def on_pre_optimizer_step(self, args, state_, control, model=None, **kwargs):
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        if grads:
            self.info.setdefault("grad_types", sorted({type(g).__name__ for g in grads.values()}))
            self.save(f"grads{state_.global_step + 1}", {name: whole(g) for name, g in grads.items()})

    def on_optimizer_step(self, args, state_, control, model=None, **kwargs):
        self.save(f"step{state_.global_step + 1}", state(model))


def main(job_file: str) -> None:
    cpu_fsdp()
    job = json.loads(Path(job_file).read_text())
    for teacher in job["teachers"]:
        launched = train_and_record(job, teacher)
        gc.collect()  # the trainer, gone with train_and_record's frame: its DDP module or FSDP states hold the group
    if launched == DistributedType.DEEPSPEED:
        # DeepSpeed (0.19.8) keeps one gloo group's threads alive past every destroy call, held where
        # no Python object reaches (the same happens to a DDP run once deepspeed is installed, which
        # is why CI does not install it): leave without the interpreter's finalization, the place
        # of the exit race that destroy_group() guards against; the records are written
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    destroy_group()  # and check that its gloo threads ended (fsdp_worker.py says why)


def train_and_record(job: dict, teacher: str) -> DistributedType:
    """One run of ``teacher``'s kind, recorded; returns the launcher's distributed type."""
    out = Path(job["out"]) / teacher
    out.mkdir(parents=True, exist_ok=True)
    args = config(out / "run", teacher_model_kind=teacher, **job.get("config", {}))
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
        # the lm-heads as compute_loss read them, after the forwards (nothing ran in between)
        losses.append({"loss": float(loss.detach()), "step_rows": inputs.get("step_rows"),
                       "model": type(model).__name__, "head": describe(output_head(model).weight),
                       "teacher_head": describe(output_head(trainer.teacher_model).weight)})
        return loss

    trainer._prepare_training_batch, trainer.compute_loss = prepare_spy, loss_spy
    trainer.train()
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)  # DDP under torchrun has neither plugin
    deepspeed = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    result = {"rank": rank, "world_size": args.world_size, "distributed_type": str(trainer.accelerator.distributed_type),
              "fsdp_version": getattr(plugin, "fsdp_version", None), "zero_stage": getattr(deepspeed, "zero_stage", None),
              "backend": dist.get_backend() if dist.is_initialized() else None,
              "teacher_is_model": trainer.teacher_model is trainer.model,
              "batches": batches, "losses": losses, "log_history": trainer.state.log_history, **recorder.info}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    launched = trainer.accelerator.distributed_type
    if launched == DistributedType.DEEPSPEED:
        trainer.accelerator.free_memory()  # DeepSpeed's engine holds its hooks and groups until destroyed
    return launched


if __name__ == "__main__":
    main(sys.argv[1])
