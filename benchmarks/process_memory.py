"""A process's memory for the one-step memory benchmarks (``trl_gkd_memory``, ``trl_opsdl_memory``):
on CUDA the allocator's counters, on the CPU the resident size and its high-water mark (VmHWM)."""
from __future__ import annotations

import os


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
