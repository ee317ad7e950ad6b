"""Turn a pytest-benchmark JSON file into the device report: markdown, JSON and a PNG plot.

    python -m benchmarks.report BENCHMARK_JSON --out DIR [--unmeasured FILE] [--tests-log FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

TARGET_SHAPE = (8192, 4096, 128256)  # N, H, V of the targets
PLOT_SHAPE = (4096, 128256)  # H, V of the N sweep that is plotted
LIGER = ("liger_fused_linear_jsd", "liger_jsd_loss_chunked")
MEMORY_BUDGET_MIB = 64.0


def load_rows(benchmark_json: Path) -> tuple[dict, list[dict]]:
    data = json.loads(benchmark_json.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if "provider" in b.get("extra_info", {})]
    return data.get("machine_info", {}), rows


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _by_shape(rows: list[dict]) -> dict[tuple[int, int, int], dict[str, dict]]:
    table: dict = defaultdict(dict)
    for r in rows:
        table[(r["n"], r["hidden"], r["vocab"])][r["provider"]] = r
    return dict(sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])))


def fastest_liger(providers: dict[str, dict]) -> Optional[dict]:
    timed = [providers[p] for p in LIGER if p in providers]
    return min(timed, key=lambda r: r["median_ms"]) if timed else None


def targets(table: dict) -> list[dict]:
    """The issue's targets at N=8192, H=4096, V=128256, each with its measured value."""
    out = []
    at = table.get(TARGET_SHAPE, {})
    full, sampled, liger = at.get("opsdl_triton_full"), at.get("opsdl_triton_sampled"), fastest_liger(at)

    def add(name: str, value: Optional[float], bound: float, higher_is_better: bool, unit: str = "") -> None:
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        out.append({"target": name, "value": value, "bound": bound, "met": met, "unit": unit})

    def ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
        return a["median_ms"] / b["median_ms"] if a and b else None

    add("full time / fastest Liger time", ratio(full, liger), 1.0, False, "x")
    add("full fraction of the floor", full.get("fraction_of_floor") if full else None, 0.7, True)
    add("sampled time / full time", ratio(sampled, full), 0.8, False, "x")
    add("full extra memory", full["peak_extra_mib"] if full else None, MEMORY_BUDGET_MIB, False, " MiB")
    sweep = {v: p["opsdl_triton_full"]["peak_extra_mib"] for (n, h, v), p in table.items()
             if n == 8192 and h == 4096 and "opsdl_triton_full" in p}
    if len(sweep) > 1:
        spread = max(sweep.values()) - min(sweep.values())
        add(f"full extra memory spread over V in {sorted(sweep)}", spread, MEMORY_BUDGET_MIB, False, " MiB")
    return out


def markdown(machine: dict, table: dict, goals: list[dict], unmeasured: list[dict], tests_summary: str) -> str:
    lines = [
        "# opsdl device report",
        "",
        f"- GPU: {machine.get('gpu', 'none')} ({machine.get('gpu_memory_gib', '-')} GiB), CUDA {machine.get('cuda', '-')}",
        f"- torch {machine.get('torch')}, triton {machine.get('triton')}, liger-kernel {machine.get('liger_kernel')}, "
        f"Python {machine.get('python')}",
        f"- Kernel tests (compiled Triton on a GPU; interpreted in a CPU dry run): {tests_summary or 'not run'}",
    ]
    rate = next((r.get("matmul_tflops") for p in table.values() for r in p.values() if r.get("matmul_tflops")), None)
    lines += [f"- Measured bf16 matmul rate: {_fmt(rate)} TFLOP/s (the floor's yardstick)", ""]
    lines += ["## Targets (N=8192, H=4096, V=128256, bf16)", "", "| target | measured | bound | met |", "|---|---|---|---|"]
    for g in goals:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['target']} | {_fmt(g['value'], 3)}{g['unit'] if g['value'] is not None else ''} "
                     f"| {g['bound']}{g['unit']} | {met} |")
    lines += ["", "## Every measurement (forward + backward, median)", ""]
    for (n, h, v), providers in table.items():
        liger = fastest_liger(providers)
        lines += [f"### N={n}, H={h}, V={v}", "",
                  "| provider | ms | extra MiB | TFLOP/s | of floor | time / fastest Liger | memory / that Liger |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in sorted(providers.items(), key=lambda kv: kv[1]["median_ms"]):
            t_ratio = r["median_ms"] / liger["median_ms"] if liger else None
            m_ratio = None
            if liger and r["peak_extra_mib"] is not None and liger["peak_extra_mib"]:
                m_ratio = r["peak_extra_mib"] / liger["peak_extra_mib"]
            lines.append(f"| {name} | {_fmt(r['median_ms'], 2)} | {_fmt(r['peak_extra_mib'])} | {_fmt(r.get('tflops'))} "
                         f"| {_fmt(r.get('fraction_of_floor'), 2)} | {_fmt(t_ratio, 2)} | {_fmt(m_ratio, 3)} |")
        lines.append("")
    if unmeasured:
        lines += ["## Not measured", ""] + [f"- {u['provider']} at {u['shape']}: {u['reason']}" for u in unmeasured]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = defaultdict(int)
    for n, h, v in table:
        sweeps[(h, v)] += 1
    # the target's N sweep, or (a CPU dry run) the (H, V) with the most N values
    plotted = PLOT_SHAPE if PLOT_SHAPE in sweeps else max(sweeps, key=sweeps.get)
    series: dict[str, list[tuple[int, float, Optional[float]]]] = defaultdict(list)
    for (n, h, v), providers in table.items():
        if (h, v) == plotted:
            for name, r in providers.items():
                series[name].append((n, r["median_ms"], r["peak_extra_mib"]))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        ns = [p[0] for p in points]
        ax_t.plot(ns, [p[1] for p in points], marker="o", label=name)
        if all(p[2] is not None for p in points):
            ax_m.plot(ns, [max(p[2], 1e-3) for p in points], marker="o", label=name)
    for ax, ylabel in ((ax_t, "forward + backward (ms)"), (ax_m, "peak memory above inputs and grads (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    if not ax_m.lines:
        ax_m.text(0.5, 0.5, "memory is measured on CUDA only", ha="center", va="center", transform=ax_m.transAxes)
    ax_t.set_title(f"H={plotted[0]}, V={plotted[1]}")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_json", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--unmeasured", type=Path)
    parser.add_argument("--tests-log", type=Path)
    args = parser.parse_args(argv)
    machine, rows = load_rows(args.benchmark_json)
    if not rows:
        parser.error(f"{args.benchmark_json}: no benchmark rows with extra_info")
    unmeasured = json.loads(args.unmeasured.read_text()) if args.unmeasured and args.unmeasured.exists() else []
    tests_summary = ""
    if args.tests_log and args.tests_log.exists():
        summary = [ln for ln in args.tests_log.read_text().splitlines() if " passed" in ln or " failed" in ln]
        tests_summary = summary[-1].strip("= ") if summary else "no summary line (see tests.log)"
    table = _by_shape(rows)
    goals = targets(table)
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.out / "report.md", markdown(machine, table, goals, unmeasured, tests_summary))
    _atomic_write(args.out / "results.json", json.dumps(
        {"machine": machine, "kernel_tests": tests_summary, "targets": goals, "rows": rows,
         "unmeasured": unmeasured}, indent=1))
    plot(table, args.out / "plot.png")
    print(f"wrote {args.out}/report.md, results.json, plot.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
