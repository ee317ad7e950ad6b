"""Turn the benchmark runs' results files into the device report: markdown, JSON and a PNG plot.

    python -m benchmarks.report ROWS.jsonl [...] --out DIR [--tests-log FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

HEADLINE = (8192, 4096, 128256)  # N, H, V of the headline targets
RATIO_SHAPES = [HEADLINE, (16384, 3584, 152064), (8192, 4096, 32768), (8192, 4096, 65536), (8192, 4096, 256000)]
PLOT_SHAPE = (4096, 128256)  # H, V of the N sweep that is plotted
LIGER = ("liger_fused_linear_jsd", "liger_jsd_loss_chunked")
DEFAULT, SAMPLED, LEAN = "opsdl_fast", "opsdl_fast_sampled", "opsdl_lean"
LEAN_MIB, TIME_VS_LIGER, LEAN_TIME_VS_LIGER, FLOOR_FRACTION, GRAD_ERROR = 256.0, 0.9, 1.4, 0.8, 0.005


def load_rows(rows_files: list[Path]) -> dict[str, list[dict]]:
    """The lines of the results files (``$OPSDL_BENCH_ROWS`` of the benchmark runs), by kind:
    machine, timing, accuracy, unmeasured."""
    kinds: dict[str, list[dict]] = defaultdict(list)
    for path in rows_files:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                kinds[row.pop("kind")].append(row)
    return kinds


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


def leanest_liger_mib(providers: dict[str, dict]) -> Optional[float]:
    peaks = [providers[p]["peak_extra_mib"] for p in LIGER if p in providers and providers[p]["peak_extra_mib"] is not None]
    return min(peaks) if peaks else None


def _target(out: list, name: str, shape, value: Optional[float], bound: float, higher_is_better: bool,
            unit: str = "", beside: str = "") -> None:
    met = None if value is None else (value >= bound if higher_is_better else value <= bound)
    out.append({"target": name, "shape": "x".join(map(str, shape)) if shape else "", "value": value,
                "bound": bound, "met": met, "unit": unit, "beside": beside})


def _ratio(a: Optional[dict], b: Optional[dict], key: str = "median_ms") -> Optional[float]:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def targets(table: dict, accuracy: list[dict]) -> list[dict]:
    """The issue's targets, each with its measured value: speed and memory against Liger-Kernel at
    the headline shape, Qwen2.5-7B's head and the vocabulary sweep; the fraction of the 4-product
    floor; the lean path's memory and speed; sampled against full; gradient error against float64."""
    out: list[dict] = []
    for shape in RATIO_SHAPES:
        at = table.get(shape, {})
        full, lean, liger = at.get(DEFAULT), at.get(LEAN), fastest_liger(at)
        liger_note = f"fastest Liger: {liger['provider']} {liger['median_ms']:.1f} ms" if liger else ""
        _target(out, "default time / fastest Liger", shape, _ratio(full, liger), TIME_VS_LIGER, False, "x", liger_note)
        liger_mib = leanest_liger_mib(at)
        _target(out, "default extra memory / Liger's", shape,
                full["peak_extra_mib"] / liger_mib if full and liger_mib and full["peak_extra_mib"] is not None else None,
                1.0, False, "x", f"Liger (the leaner of its two): {liger_mib:.0f} MiB" if liger_mib else "")
        _target(out, "default fraction of the 4-product floor", shape, full.get("fraction_of_floor") if full else None,
                FLOOR_FRACTION, True)
        _target(out, "lean time / fastest Liger", shape, _ratio(lean, liger), LEAN_TIME_VS_LIGER, False, "x")
        _target(out, "lean extra memory", shape, lean["peak_extra_mib"] if lean else None, LEAN_MIB, False, " MiB")
    at = table.get(HEADLINE, {})
    _target(out, "sampled time / full time", HEADLINE, _ratio(at.get(SAMPLED), at.get(DEFAULT)), 1.0, False, "x")
    by_provider = {r["provider"]: r for r in accuracy}
    liger_errors = ", ".join(f"{p}: dh {by_provider[p]['dh_error']:.2%} dW {by_provider[p]['dw_error']:.2%}"
                             for p in LIGER if p in by_provider)
    for name in (DEFAULT, f"{DEFAULT}_8_chunks", LEAN):
        row = by_provider.get(name)
        shape = (row["n"], row["hidden"], row["vocab"]) if row else None
        for grad in ("dh", "dw"):
            _target(out, f"{name} {grad} error vs float64", shape, row[f"{grad}_error"] if row else None, GRAD_ERROR,
                    False, "", liger_errors)
    return out


def markdown(machine: dict, table: dict, goals: list[dict], accuracy: list[dict], unmeasured: list[dict],
             tests_summary: str) -> str:
    lines = [
        "# opsdl device report",
        "",
        f"- GPU: {machine.get('gpu', 'none')} ({machine.get('gpu_memory_gib', '-')} GiB), CUDA {machine.get('cuda', '-')}",
        f"- torch {machine.get('torch')}, triton {machine.get('triton')}, liger-kernel {machine.get('liger_kernel')}, "
        f"Python {machine.get('python')}",
        f"- Kernel tests (compiled Triton on a GPU; interpreted in a CPU dry run): {tests_summary or 'not run'}",
    ]
    rate = next((r.get("matmul_tflops") for p in table.values() for r in p.values() if r.get("matmul_tflops")), None)
    lines += [f"- Measured bf16 matmul rate (warm, median): {_fmt(rate)} TFLOP/s (the floor's yardstick)", ""]
    lines += ["## Targets", "", "| target | shape (N x H x V) | measured | bound | met | beside |", "|---|---|---|---|---|---|"]
    for g in goals:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3f}{g['unit']}"
        lines.append(f"| {g['target']} | {g['shape']} | {value} | {g['bound']}{g['unit']} | {met} | {g['beside']} |")
    if accuracy:
        lines += ["", "## Gradient error against float64 (relative Frobenius norm)", "",
                  "| provider | shape | dtype | estimator | loss | dh | dW |", "|---|---|---|---|---|---|---|"]
        for r in sorted(accuracy, key=lambda r: r["provider"]):
            lines.append(f"| {r['provider']} | {r['n']}x{r['hidden']}x{r['vocab']} | {r['dtype']} | {r['estimator']} "
                         f"| {r['loss_error']:.2e} | {r['dh_error']:.2%} | {r['dw_error']:.2%} |")
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
    parser.add_argument("rows", type=Path, nargs="+", help="results files (JSON lines) of benchmark runs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tests-log", type=Path)
    args = parser.parse_args(argv)
    kinds = load_rows([p for p in args.rows if p.exists()])
    if not kinds["timing"] and not kinds["accuracy"]:
        parser.error(f"{' '.join(map(str, args.rows))}: no timing or accuracy rows")
    machine = kinds["machine"][0] if kinds["machine"] else {}
    tests_summary = ""
    if args.tests_log and args.tests_log.exists():
        summary = [ln for ln in args.tests_log.read_text().splitlines() if " passed" in ln or " failed" in ln]
        tests_summary = summary[-1].strip("= ") if summary else "no summary line (see tests.log)"
    table = _by_shape(kinds["timing"])
    goals = targets(table, kinds["accuracy"])
    args.out.mkdir(parents=True, exist_ok=True)
    _atomic_write(args.out / "report.md", markdown(machine, table, goals, kinds["accuracy"], kinds["unmeasured"],
                                                  tests_summary))
    _atomic_write(args.out / "results.json", json.dumps(
        {"machine": machine, "kernel_tests": tests_summary, "targets": goals, "rows": kinds["timing"],
         "accuracy": kinds["accuracy"], "unmeasured": kinds["unmeasured"]}, indent=1))
    if table:
        plot(table, args.out / "plot.png")
    print(f"wrote {args.out}/report.md, results.json{', plot.png' if table else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
