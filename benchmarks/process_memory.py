"""What the TRL memory benchmarks (``trl_gkd_memory``, ``trl_opsdl_memory``) share: a process's
memory (on CUDA the allocator's counters, on the CPU the resident size and its high-water mark,
VmHWM) and the check of their ``--out``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional


def report_path(parser: argparse.ArgumentParser, out: Optional[str]) -> Path:
    """``--out`` as a path whose folder exists; refused in one line otherwise."""
    if out is None:
        parser.error("--out: required (the path of the JSON report)")
    path = Path(out)
    if not path.parent.is_dir():
        raise SystemExit(f"--out {out}: no such folder {path.parent}")
    return path


def held_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:  # resident pages now
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device) -> bool:
    """Forget the peak so far (loading, the warm-up step); False where the CPU's cannot be reset."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the high-water RSS (VmHWM)
        return True
    except OSError:
        return False


def peak_bytes(device) -> int:
    import torch

    from opsdl.steps import peak_memory_mib

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return int(peak_memory_mib(device) * 2**20)
