"""Peak memory of OPSDL on TRL: ``OPSDLTrainer`` (the fused reverse KL on final hidden states)
against TRL's own ``SDFTTrainer`` with ``distillation_mode="full_logits"`` (the (B, T, V) logits of
student and teacher), on the same model and data, two training steps each.

    python -m benchmarks.trl_opsdl_memory --out benchmarks/results/<date>-trl-opsdl-memory-<device>.json
        the GPU run: random:qwen2.5-1.5b in bf16, contexts of ~2048 tokens, answers of 256
    python -m benchmarks.trl_opsdl_memory --model tiny:qwen2 --no-bf16 --context 256 --completion 32 --out X.json
        a CPU check of the script

Data: ``--batch`` rows, each a long context of about ``--context`` tokens (filler around one fact),
the fact alone as the short context, and a question. The student answers the long-context prompt
(TRL's ``generate``, sampled at temperature 1, up to ``--completion`` tokens; random weights rarely
stop early). OPSDL's teacher reads [short context; question]. SDFT's reads its own template
"{prompt}\\n\\n{privileged_context}" with the fact as the privileged context: SDFT's definition,
the student's prompt plus something, so its teacher input is the longer one. Both: the exact
reverse KL (SDFT's ``distillation_alpha=1.0``), a frozen teacher (``teacher_model_kind="base"``),
one generation per prompt, no prompt cut, AdamW at a tiny rate. The model is written to a
temporary folder first (SDFT reloads its frozen teacher from the model's folder), and each trainer
loads it from there in its own process. The peak covers both steps (rollouts, teacher and student
forwards, backward, optimizer) from after the trainer is built: on CUDA ``max_memory_allocated``,
on the CPU the process's VmHWM (reset after building where /proc allows). Prints both and writes
the JSON report to ``--out`` (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from benchmarks.process_memory import held_bytes, peak_bytes, report_path, reset_peak

TRAINERS = ("opsdl", "sdft")
FILLER = "The committee met again and discussed the schedule, the budget and the minutes. "
FACT = "The vault code is 4417."
QUESTION = "What is the vault code?"


def _rows(tokenizer, context_tokens: int, count: int) -> list[dict]:
    """``count`` rows whose long context is about ``context_tokens`` tokens, the fact in the middle."""
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    half = FILLER * max(1, context_tokens // (2 * per_filler))
    return [{"long_context": half + FACT + " " + half, "short_context": FACT, "question": QUESTION}] * count


def one_run(kind: str, args: argparse.Namespace) -> dict:
    """One trainer's two steps, in this (fresh) process, from the model folder ``args.folder``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opsdl.cli import return_freed_memory_to_the_system
    from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer
    from opsdl.model import load_tokenizer, resolve_device

    return_freed_memory_to_the_system()
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.folder)
    rows = _rows(tokenizer, args.context, args.batch)
    common = dict(output_dir=tempfile.mkdtemp(prefix="opsdl-trl-memory-"), per_device_train_batch_size=args.batch,
                  max_completion_length=args.completion, max_steps=2, num_generations=1, max_prompt_length=None,
                  teacher_model_kind="base", learning_rate=1e-7, logging_steps=1, report_to=[], save_strategy="no",
                  seed=0, bf16=args.bf16, use_cpu=device.type == "cpu",
                  model_init_kwargs={"dtype": "bfloat16" if args.bf16 else "float32"})
    if kind == "opsdl":
        trainer = OPSDLTrainer(args.folder, args=OPSDLConfig(**common, estimator="full"),
                               train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:
        sdft_rows = [{"prompt": [{"role": "user", "content": f"{r['long_context']}\n\n{r['question']}"}],
                      "privileged_context": r["short_context"]} for r in rows]
        trainer = SDFTTrainer(args.folder, args=SDFTConfig(**common, distillation_mode="full_logits",
                                                           distillation_alpha=1.0),
                              train_dataset=Dataset.from_list(sdft_rows), processing_class=tokenizer)
    reset = reset_peak(device)
    held = held_bytes(device)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = peak_bytes(device)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {"trainer": type(trainer).__name__, "peak_bytes": peak, "peak_gib": peak / 2**30,
            "held_before_training_bytes": held, "rise_bytes": peak - held, "peak_reset_after_building": reset,
            "losses": [h["loss"] for h in logged],
            "completion_tokens": [h.get("completions/mean_length") for h in logged], "train_s": seconds,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def run_child(kind: str, args: argparse.Namespace) -> dict:
    child = [sys.executable, "-m", "benchmarks.trl_opsdl_memory", "--one", kind, "--folder", args.folder,
             "--context", str(args.context), "--completion", str(args.completion), "--batch", str(args.batch),
             "--device", args.device, "--bf16" if args.bf16 else "--no-bf16"]
    done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"kind": kind, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return {"kind": kind, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the JSON report (written atomically); required")
    parser.add_argument("--model", default="random:qwen2.5-1.5b", help="a name opsdl train accepts")
    parser.add_argument("--context", type=int, default=2048, help="long-context tokens per row (about)")
    parser.add_argument("--completion", type=int, default=256, help="answer tokens per row (at most)")
    parser.add_argument("--batch", type=int, default=2, help="rows per step")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 weights and compute (default); --no-bf16: float32")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer folder for tiny:/random: models (default: the embedded model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", choices=TRAINERS, default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)  # the child's model folder
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args.one, args)))
        return 0

    from opsdl.files import write_atomic
    from opsdl.model import load_model

    out = report_path(parser, args.out)
    with tempfile.TemporaryDirectory(prefix="opsdl-trl-memory-model-") as folder:
        import torch

        model, tokenizer = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, seed=0,
                                      tokenizer_path=args.tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        args.folder = folder
        rows = [run_child(kind, args) for kind in TRAINERS]
    for row in rows:
        if "error" in row:
            print(f"{row['kind']}: failed: {row['error']}")
        else:
            print(f"{row['kind']} ({row['trainer']}): peak {row['peak_bytes'] / 2**20:.0f} MiB, rise "
                  f"{row['rise_bytes'] / 2**20:.0f} MiB, losses {row['losses']}, {row['train_s']:.1f} s")
    report = {"benchmark": "trl_opsdl_memory", "command": " ".join(["python -m benchmarks.trl_opsdl_memory",
                                                                    *(argv if argv is not None else sys.argv[1:])]),
              "settings": {"model": args.model, "tokenizer": args.tokenizer, "context_tokens": args.context, "completion_tokens": args.completion,
                           "batch": args.batch, "bf16": args.bf16, "device": args.device, "steps": 2},
              "rows": rows}
    opsdl_row, sdft_row = rows
    if "error" not in opsdl_row and "error" not in sdft_row:
        report["peak_ratio_sdft_over_opsdl"] = sdft_row["peak_bytes"] / opsdl_row["peak_bytes"]
        print(f"peak: SDFT full logits {sdft_row['peak_bytes'] / 2**20:.0f} MiB, OPSDL fused "
              f"{opsdl_row['peak_bytes'] / 2**20:.0f} MiB ({report['peak_ratio_sdft_over_opsdl']:.2f}x)")
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print(f"report: {out}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
