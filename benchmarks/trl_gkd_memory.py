"""Peak memory of one GKD training step (forward + backward of ``compute_loss``): TRL's
``GKDTrainer`` (full (B, T, V) logits) against ``opsdl``'s ``FusedGKDTrainer`` (fused kernels).

    python -m benchmarks.trl_gkd_memory --out benchmarks/results/<date>-trl-gkd-memory-cpu.json

A tiny random Llama (float32, ``--hidden`` 64, 2 layers) with SmolLM2's vocabulary (V=49152) and a
frozen teacher of the same shape (another seed): the model is small, so the step's memory is the
loss's. One batch of ``--batch`` rows of ``--prompt`` prompt tokens (labels -100) and
``--completion`` completion tokens (random ids), as GKD's collator gives it; ``beta`` 1.0 (reverse
KL; the fused trainer takes 0.0 or 1.0) at TRL's temperature of 1. Each loss runs in its own
process: build both models and the trainer, one warm-up step (the fused path compiles its CPU
kernels there), then the measured step. Peak: on CUDA ``torch.cuda.max_memory_allocated`` (reset
before the measured step); on the CPU the process's ``ru_maxrss`` after the measured step, the
high-water mark reset before it (``/proc/self/clear_refs``; where that cannot be written the peak
includes loading, which the report says) and glibc returning freed blocks (as ``opsdl`` sets it).
Also reported: the memory held just before the step and the step's rise above it. Prints both
numbers and writes the JSON report to ``--out`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.process_memory import held_bytes, peak_bytes, report_path, reset_peak

LOSSES = ("trl", "fused")


def one_step(loss_kind: str, args: argparse.Namespace) -> dict:
    """One loss's measured step, in this (fresh) process."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import tempfile

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from opsdl.cli import return_freed_memory_to_the_system
    from opsdl.integrations.trl.gkd import FusedGKDTrainer
    from opsdl.model import load_tokenizer, resolve_device, tiny_config

    return_freed_memory_to_the_system()
    device = resolve_device(args.device)
    tokens = args.prompt + args.completion
    config = tiny_config("llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, max_position_embeddings=max(1024, tokens))
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    tokenizer = load_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}])
    trainer_class = GKDTrainer if loss_kind == "trl" else FusedGKDTrainer
    with tempfile.TemporaryDirectory(prefix="opsdl-gkd-memory-") as scratch:
        gkd_args = GKDConfig(output_dir=scratch, beta=args.beta, report_to=[], bf16=False,
                             use_cpu=device.type == "cpu")
        trainer = trainer_class(model=student, teacher_model=teacher, args=gkd_args, train_dataset=dataset,
                                processing_class=tokenizer)
    model = trainer.model
    model.train()

    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, min(args.vocab, len(tokenizer)), (args.batch, tokens), generator=generator)
    labels = input_ids.clone()
    labels[:, :args.prompt] = -100
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
              "labels": labels.to(device)}

    def step() -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach()), time.perf_counter() - started

    _, warm_up_s = step()
    reset = reset_peak(device)
    held = held_bytes(device)
    loss, step_s = step()
    peak = peak_bytes(device)
    return {"loss": loss_kind, "trainer": trainer_class.__name__, "peak_bytes": peak, "peak_gib": peak / 2**30,
            "held_before_step_bytes": held, "step_rise_bytes": peak - held, "peak_reset_after_loading": reset,
            "loss_value": loss, "warm_up_step_s": warm_up_s, "step_s": step_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def _settings(args: argparse.Namespace) -> dict:
    return {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
            "prompt_tokens": args.prompt, "completion_tokens": args.completion, "beta": args.beta,
            "dtype": "float32", "device": args.device,
            # one (B, T - 1, V) float32 tensor: what each of TRL's logits-sized temporaries costs
            "logits_tensor_bytes": args.batch * (args.prompt + args.completion - 1) * args.vocab * 4}


def run_child(loss_kind: str, args: argparse.Namespace) -> dict:
    child = [sys.executable, "-m", "benchmarks.trl_gkd_memory", "--one", loss_kind, "--vocab", str(args.vocab),
             "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
             "--prompt", str(args.prompt), "--completion", str(args.completion), "--beta", str(args.beta),
             "--device", args.device]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(child, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"loss": loss_kind, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the JSON report (written atomically); required")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's by default)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row (labels -100)")
    parser.add_argument("--completion", type=int, default=2048, help="completion tokens per row (counted)")
    parser.add_argument("--beta", type=float, default=1.0, choices=(0.0, 1.0))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", choices=LOSSES, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_step(args.one, args)))
        return 0

    from opsdl.files import write_atomic

    out = report_path(parser, args.out)
    rows = [run_child(kind, args) for kind in LOSSES]
    for row in rows:
        if "error" in row:
            print(f"{row['loss']}: failed: {row['error']}")
        else:
            print(f"{row['loss']} ({row['trainer']}): peak {row['peak_bytes'] / 2**20:.0f} MiB, step rise "
                  f"{row['step_rise_bytes'] / 2**20:.0f} MiB, loss {row['loss_value']:.6f}, step {row['step_s']:.2f} s")
    report = {"benchmark": "trl_gkd_memory", "command": " ".join(["python -m benchmarks.trl_gkd_memory",
                                                                  *(argv if argv is not None else sys.argv[1:])]),
              "settings": _settings(args), "rows": rows}
    trl_row, fused_row = rows
    if "error" not in trl_row and "error" not in fused_row:
        report["peak_ratio_trl_over_fused"] = trl_row["peak_bytes"] / fused_row["peak_bytes"]
        report["step_rise_ratio_trl_over_fused"] = trl_row["step_rise_bytes"] / max(fused_row["step_rise_bytes"], 1)
        report["loss_relative_difference"] = (abs(trl_row["loss_value"] - fused_row["loss_value"])
                                              / max(abs(trl_row["loss_value"]), 1e-30))
        print(f"peak: TRL {trl_row['peak_bytes'] / 2**20:.0f} MiB, fused {fused_row['peak_bytes'] / 2**20:.0f} MiB "
              f"({report['peak_ratio_trl_over_fused']:.1f}x)")
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
