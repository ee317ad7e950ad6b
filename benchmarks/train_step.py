"""Where a training step's time goes: ``opsdl train`` itself, split into its phases, for each rollout
engine x compute dtype x context length.

    python -m benchmarks.train_step                                   # SmolLM2 (embedded), CPU
    python -m benchmarks.train_step --contexts 1024,4096 --engines hf,vllm --compute float32,bf16
    python -m benchmarks.train_step --model random:qwen2.5-1.5b --tokenizer TOK --device cuda --engines hf

Each setting is a fresh ``opsdl train`` process (``--steps`` steps, the defaults otherwise: frozen
teacher, exact KL, 2 prompts x 24 new tokens per step) in a scratch folder. Its ``log.jsonl``
records every step's phases (``opsdl.steps.PHASES``: rollout, teacher forward, student forward, the
fused loss's forward, the backward of both, AdamW, the push of the new weights into the engine);
the first step is left out (AdamW allocates its state, compiled paths warm up), and the median of
the rest is reported, with the answer rate of the rollouts over all steps. One JSON line per
setting on stdout and into ``--out`` (with the machine: CPU model and its bf16 units, or GPU).
A setting that cannot run here (vLLM not installed) is a row with its one-line reason.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from opsdl.precision import cpu_bf16_units

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    info = {"cpu": model, "cores": os.cpu_count(), "cpu_bf16_units": cpu_bf16_units(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(row: dict, out: str | None) -> None:
    """One JSON line on stdout, and appended to ``out`` at once (a run cut short keeps its rows)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_setting(args: argparse.Namespace, engine: str, compute: str, context: int) -> dict:
    """One ``opsdl train`` process; its log's phases, median over the steps after the first."""
    row = {"model": args.model, "engine": engine, "compute": compute, "context_tokens": context, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="opsdl-train-step-") as scratch:
        command = [sys.executable, "-m", "opsdl", "train", "--model", args.model, "--context-tokens", str(context),
                   "--steps", str(args.steps), "--rollout-engine", engine,
                   "--bf16" if compute == "bf16" else "--no-bf16", "--device", args.device,
                   "--max-length", str(context + 1024), "--out", scratch, "--no-save-optimizer"]
        command += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        command += args.extra.split() if args.extra else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        row["process_seconds"] = time.perf_counter() - started
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            row["error"] = next((line for line in reversed(lines) if "error" in line.lower()),
                                lines[-1] if lines else f"exit {done.returncode}")
            return row
        log = [json.loads(line) for line in (Path(scratch) / "log.jsonl").read_text().splitlines()]
    said = [line for line in done.stdout.splitlines() if line.startswith("opsdl train: compute:")]
    row["setting"] = said[0].removeprefix("opsdl train: ") if said else None
    warm = log[1:] or log
    row["step_seconds"] = statistics.median(r["seconds"] for r in warm)
    for phase in warm[0]["phase_seconds"]:
        row[f"{phase}_seconds"] = statistics.median(r["phase_seconds"][phase] for r in warm)
    rates = [r["answer_rate"] for r in log if r["answer_rate"] is not None]
    row["answer_rate"] = sum(rates) / len(rates) if rates else None
    row["peak_memory_mib"] = max(r["peak_memory_mib"] for r in log)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer folder for random: models")
    parser.add_argument("--contexts", default="1024,4096", help="comma-separated long-context lengths in tokens")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated rollout engines")
    parser.add_argument("--compute", default="float32,bf16", help="comma-separated compute dtypes")
    parser.add_argument("--steps", type=int, default=3, help="steps per setting (the first is not counted)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--extra", default="", help="more `opsdl train` options, space-separated")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps: expected at least 2 (the first is not counted), got {args.steps}")
    emit({"machine": machine()}, args.out)
    for context in [int(c) for c in args.contexts.split(",")]:
        for engine in args.engines.split(","):
            for compute in args.compute.split(","):
                emit(run_setting(args, engine, compute, context), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
