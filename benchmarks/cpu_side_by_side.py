"""The CPU side by side: forward + backward of the reverse KL at SmolLM2's head (H=576, V=49152) for
opsdl's PyTorch implementation (its default path and the lean one), naive PyTorch and Liger-Kernel's
chunked loss under torch.compile, in fp32 and bf16, with each loss and gradient's error against a
float64 reference on the same inputs.

    python -m benchmarks.cpu_side_by_side [--rows 1024,4096] [--dtypes float32,bfloat16] [--rounds 3]
                                          [--providers a,b] [--hidden 576] [--vocab 49152] [--out DIR]

Writes ``DIR/report.md`` and ``DIR/results.json``; DIR defaults to
``benchmarks/results/<date>-cpu-<model>/``. The providers' timed steps are interleaved round by round,
so a neighbour's load on a shared machine falls on all of them alike; the median and the fastest of
``--rounds`` steps after one untimed step (torch.compile's work is in that one, reported as the
first call).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import torch

from opsdl_kernels.matmul import cpu_flags, native_16bit_products

from .measure import relative_norm_error, step
from .problems import Problem, Shape, make_problem
from .providers import PROVIDERS

DEFAULT = ["opsdl_torch", "opsdl_torch_lean", "naive", "liger_jsd_loss_chunked_compiled"]
LABELS = {"opsdl_torch": "opsdl default (fast path)", "opsdl_torch_lean": "opsdl lean (256 MiB)",
          "naive": "naive PyTorch", "liger_jsd_loss_chunked_compiled": "Liger chunked JSD, compiled"}
LIGER = "liger_jsd_loss_chunked_compiled"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_cpu() -> dict:
    """What the CPU reports, and what PyTorch and the library make of it."""
    def version_of(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "model": cpu_model(), "flags": [f for f in FLAGS if f in cpu_flags()],
        "torch_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "onednn_bf16_products": native_16bit_products(torch.bfloat16),
        "onednn_fp16_products": native_16bit_products(torch.float16),
        "torch": torch.__version__, "liger_kernel": version_of("liger-kernel"), "python": platform.python_version(),
    }


def reference64(problem: Problem, block: int = 512) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The mean reverse KL and its gradients (dh, dW) in float64, a block of rows at a time."""
    h, g, w = problem.student.detach().double(), problem.teacher.double(), problem.weight.detach().double()
    n = h.shape[0]
    loss, dh, dw = 0.0, torch.empty_like(h), torch.zeros_like(w)
    for r0 in range(0, n, block):
        logp = torch.log_softmax(h[r0:r0 + block] @ w.t(), 1)
        logq = torch.log_softmax(g[r0:r0 + block] @ w.t(), 1)
        p = logp.exp()
        kl = (p * (logp - logq)).sum(1)
        loss += float(kl.sum())
        grad = p * (logp - logq - kl[:, None]) / n
        dh[r0:r0 + block] = grad @ w
        dw += grad.t() @ h[r0:r0 + block]
    return loss / n, dh, dw


def measure(shape: Shape, dtype: torch.dtype, names: list[str], rounds: int) -> list[dict]:
    problem = make_problem(shape, dtype, "cpu")
    ref_loss, ref_dh, ref_dw = reference64(problem)
    rows = {name: {"provider": name, "n": shape.n, "hidden": shape.hidden, "vocab": shape.vocab,
                   "dtype": str(dtype).replace("torch.", ""), "reference_loss": ref_loss, "times_ms": []}
            for name in names}
    for name in names:  # the untimed first step: compiles, and the values the errors are taken from
        start = time.perf_counter()
        loss = step(PROVIDERS[name].loss, problem, "cpu")
        rows[name].update(first_call_s=time.perf_counter() - start, loss=float(loss),
                          loss_error=abs(float(loss) - ref_loss) / abs(ref_loss),
                          dh_error=relative_norm_error(problem.student.grad, ref_dh),
                          dw_error=relative_norm_error(problem.weight.grad, ref_dw))
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            step(PROVIDERS[name].loss, problem, "cpu")
            rows[name]["times_ms"].append((time.perf_counter() - start) * 1e3)
    for row in rows.values():
        row["median_ms"], row["min_ms"] = statistics.median(row["times_ms"]), min(row["times_ms"])
    for row in rows.values():
        for other in (LIGER, "naive"):
            if other in rows:
                row[f"time_over_{other}"] = row["median_ms"] / rows[other]["median_ms"]
                row[f"min_over_{other}"] = row["min_ms"] / rows[other]["min_ms"]
    return list(rows.values())


def markdown(machine: dict, rows: list[dict], command: str) -> str:
    lines = [
        f"# CPU side by side: reverse KL at N x {rows[0]['hidden']} x {rows[0]['vocab']}, forward + backward",
        "",
        f"- CPU: {machine['model']}, flags: {' '.join(machine['flags']) or 'none of ' + ', '.join(FLAGS)}; "
        f"torch capability {machine['torch_capability']}, {machine['threads']} threads; oneDNN products: "
        f"bf16 {'yes' if machine['onednn_bf16_products'] else 'no'}, fp16 {'yes' if machine['onednn_fp16_products'] else 'no'}",
        f"- torch {machine['torch']}, liger-kernel {machine['liger_kernel']}, Python {machine['python']}",
        f"- Command: `{command}`",
        "- Time: median of the timed steps (rounds interleaved over the providers) after one untimed first call "
        "(whose time includes torch.compile); the fastest step beside it, and every step. Other jobs may have "
        "shared this machine (a step can take 2-3 times its undisturbed time): compare ratios within a table, "
        "not times across runs. Errors: against float64 on the same inputs (loss: relative; dh, dW: relative "
        "Frobenius norm).",
        "",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for n in dict.fromkeys(r["n"] for r in rows if r["dtype"] == dtype):
            part = [r for r in rows if r["dtype"] == dtype and r["n"] == n]
            lines += [f"## {dtype}, N={n} (float64 loss {part[0]['reference_loss']:.6f})", "",
                      "| provider | median ms | / Liger compiled | / naive | fastest ms | / Liger compiled | steps ms "
                      "| first call s | loss | loss error | dh error | dW error |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in part:
                ratio = {k: f"{r[k]:.2f}" if k in r else "-"
                         for k in (f"time_over_{LIGER}", "time_over_naive", f"min_over_{LIGER}")}
                lines.append(f"| {LABELS.get(r['provider'], r['provider'])} | {r['median_ms']:.0f} "
                             f"| {ratio[f'time_over_{LIGER}']} | {ratio['time_over_naive']} | {r['min_ms']:.0f} "
                             f"| {ratio[f'min_over_{LIGER}']} | {' '.join(f'{t:.0f}' for t in r['times_ms'])} "
                             f"| {r['first_call_s']:.1f} | {r['loss']:.6f} | {r['loss_error']:.1e} | {r['dh_error']:.1e} "
                             f"| {r['dw_error']:.1e} |")
            lines.append("")
    return "\n".join(lines)


def default_out() -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    return Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}-cpu-{slug}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,4096")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--providers", default=",".join(DEFAULT))
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    names = args.providers.split(",")
    unknown = [n for n in names if n not in PROVIDERS or "cpu" not in PROVIDERS[n].devices]
    if unknown:
        parser.error(f"--providers: not CPU providers: {', '.join(unknown)}")
    names = [n for n in names if PROVIDERS[n].available()]
    out = args.out or default_out()
    machine = describe_cpu()
    rows = []
    for dtype in args.dtypes.split(","):
        for n in map(int, args.rows.split(",")):
            rows += measure(Shape(n, args.hidden, args.vocab), getattr(torch, dtype), names, args.rounds)
            print(f"{dtype} N={n}: " + ", ".join(f"{r['provider']} {r['median_ms']:.0f} ms" for r in rows[-len(names):]),
                  flush=True)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.cpu_side_by_side", *(sys.argv[1:] if argv is None else argv)])
    (out / "report.md").write_text(markdown(machine, rows, command))
    (out / "results.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}/report.md, results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
