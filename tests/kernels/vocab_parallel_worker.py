"""The rank side of tests/kernels/test_vocab_parallel.py, started there with ``torchrun`` (not a test module).

    TRITON_INTERPRET=1 torchrun --nproc-per-node K tests/kernels/vocab_parallel_worker.py OUT.json

Every rank builds the same inputs, calls the loss once with the whole head (the single-process
result) and once with its slice of the vocabulary (``vocab_group``), under allocation tracking,
and rank 0 writes the largest differences per case.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
# Imported before the process group exists, on purpose: see ``destroy_group``.
import torch.distributed.nn  # noqa: F401
from torch.distributed.tensor.debug import _clear_sharding_prop_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from opsdl_kernels import fused_kl_loss, fused_token_logprobs  # noqa: E402
from tests.kernels.reference import reference_kl, reference_logprobs, rel_err  # noqa: E402
from tests.kernels.tracking import Tracker  # noqa: E402

VOCAB, HIDDEN, TEACHER_HIDDEN = 803, 32, 24  # 803 rows split unevenly over 2 or 3 ranks
FULL = dict(mask=True, token_weights=True, temperature=0.7, softcap=5.0, bias=True, teacher_bias=True,
            teacher_weight=True)
CASES = {
    "kl fast": dict(kind="kl"),
    "kl lean": dict(kind="kl", memory="lean"),
    "kl fast, every option, 2 chunks": dict(kind="kl", reverse_weight=0.5, rows=600, budget="two chunks", **FULL),
    "kl lean, every option, none": dict(kind="kl", reverse_weight=0.5, memory="lean", reduction="none", **FULL),
    "forward kl fast, sum": dict(kind="kl", reverse_weight=0.0, reduction="sum"),
    "sampled fast, every option": dict(kind="sampled", **FULL),
    "sampled lean, sum": dict(kind="sampled", memory="lean", reduction="sum", bias=True),
    "logprobs lean, none": dict(kind="logprob", reduction="none", softcap=5.0, bias=True),
    "logprobs fast, mean": dict(kind="logprob", reduction="mean", temperature=0.7),
    "no gradient, log-ratio": dict(kind="kl", no_grad=True, **FULL),
    "triton kl fast, every option": dict(kind="kl", impl="triton", reverse_weight=0.5, **FULL),
    "triton kl lean, 3 blocks x 2 slabs": dict(kind="kl", impl="triton", memory="lean", rows=300, budget=400_000,
                                               bias=True),
    "triton sampled fast": dict(kind="sampled", impl="triton", mask=True),
    "triton logprobs lean": dict(kind="logprob", impl="triton", reduction="none"),
    "bf16 kl fast, every option": dict(kind="kl", dtype="bfloat16", **FULL),
    "bf16 sampled lean": dict(kind="sampled", dtype="bfloat16", memory="lean", bias=True),
    "dtensor head kl fast": dict(kind="kl", dtensor=True, teacher_weight=True, bias=True),
}


def inputs(case: dict, seed: int) -> dict:
    """Fresh random inputs of one case, the same on every rank (the seed is shared)."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.get("dtype", "float32"))
    rows = case.get("rows", 24)
    lead = (2, rows // 2)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    teacher_hidden = TEACHER_HIDDEN if case.get("teacher_weight") else HIDDEN
    x = {"h": rand(*lead, HIDDEN), "g": rand(*lead, teacher_hidden), "w": rand(VOCAB, HIDDEN, scale=0.3),
         "targets": torch.randint(0, VOCAB, lead, generator=g)}
    x["u"] = rand(VOCAB, TEACHER_HIDDEN, scale=0.3) if case.get("teacher_weight") else None
    x["b"] = rand(VOCAB, scale=0.5) if case.get("bias") else None
    x["c"] = rand(VOCAB, scale=0.5) if case.get("teacher_bias") else None
    x["mask"] = torch.rand(lead, generator=g) > 0.3 if case.get("mask") else None
    x["token_weights"] = torch.rand(lead, generator=g).to(dtype) + 0.5 if case.get("token_weights") else None
    x["upstream"] = torch.randn(lead, generator=g)
    return x


def budget(case: dict):
    """"two chunks": room for 400 rows of both sides' fp32 logits of the widest slice, so the fast
    path, which computes all 600 rows (the masked ones as zeros), cuts them into two chunks of 320
    (chunks are whole multiples of 64 rows) on any number of ranks."""
    if case.get("budget") == "two chunks":
        return 400 * -(-VOCAB // dist.get_world_size()) * 8
    return case.get("budget")


def call(case: dict, x: dict, w, u, b, c, **vocab) -> tuple:
    """The loss of ``case`` and its gradients in h, the head and its bias (None where none)."""
    h = x["h"].clone().requires_grad_(not case.get("no_grad"))
    leaves = [t for t in (w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(not case.get("no_grad"))
    common = dict(temperature=case.get("temperature", 1.0), softcap=case.get("softcap"),
                  reduction=case.get("reduction", "mean"), impl=case.get("impl", "torch"),
                  memory=case.get("memory", "auto"), memory_budget=budget(case))
    log_ratio = None
    if case["kind"] == "logprob":
        loss = fused_token_logprobs(h, w, x["targets"], bias=b, **common, **vocab)
    else:
        out = fused_kl_loss(h, x["g"], w, u, reverse_weight=case.get("reverse_weight", 1.0), targets=x["targets"],
                            estimator="sampled" if case["kind"] == "sampled" else "full", mask=x["mask"],
                            token_weights=x["token_weights"], bias=b, teacher_bias=c, return_log_ratio=True,
                            **common, **vocab)
        loss, log_ratio = out
    if case.get("no_grad"):
        return loss.detach(), log_ratio, None, None, None
    (loss * x["upstream"] if loss.dim() else loss).sum().backward()
    grad = lambda t: None if t is None else t.grad  # noqa: E731
    return loss.detach(), log_ratio, h.grad, grad(w), grad(b)


def relative(a, b) -> dict:
    """Both norms of the difference, relative to the expected value's: max-norm (as the kernel tests
    measure, ``rel_err``) and Frobenius."""
    if a is None and b is None:
        return {"max": 0.0, "fro": 0.0}
    a, b = a.detach().double(), b.detach().double()
    return {"max": rel_err(a, b), "fro": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def float64_reference(case: dict, x: dict) -> tuple:
    """The loss of ``case`` in float64 and its gradients in h, the head and its bias (None where none)."""
    options = dict(temperature=case.get("temperature", 1.0), softcap=case.get("softcap"), bias=x["b"])
    if case["kind"] == "logprob":
        reduction = case.get("reduction", "none")
        rows = x["targets"].numel()
        upstream = {"none": x["upstream"], "sum": torch.ones(x["targets"].shape),
                    "mean": torch.full(x["targets"].shape, 1.0 / rows)}[reduction]
        logp, grads = reference_logprobs(x["h"], x["w"], x["targets"], upstream=upstream, **options)
        value = {"none": logp, "sum": logp.sum(), "mean": logp.sum() / rows}[reduction]
        return value, grads
    return reference_kl(x["h"], x["g"], x["w"], x["u"], targets=x["targets"],
                        estimator="sampled" if case["kind"] == "sampled" else "full", mask=x["mask"],
                        token_weights=x["token_weights"], teacher_bias=x["c"], reduction=case.get("reduction", "mean"),
                        reverse_weight=case.get("reverse_weight", 1.0), upstream=x["upstream"], **options)


def run_case(name: str, case: dict, seed: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = inputs(case, seed)
    bounds = torch.tensor_split(torch.arange(VOCAB), world)  # uneven: 402/401, or 268/268/267
    start, stop = int(bounds[rank][0]), int(bounds[rank][-1]) + 1
    one = call(case, x, x["w"].clone(), x["u"], *(None if t is None else t.clone() for t in (x["b"], x["c"])))

    def part(t):
        return None if t is None else t[start:stop].clone()

    with Tracker() as tracked:
        if case.get("dtensor"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            mesh = init_device_mesh("cpu", (world,))
            w, u, b, c = (None if t is None else distribute_tensor(t, mesh, [Shard(0)])
                          for t in (x["w"], x["u"], x["b"], x["c"]))
            sharded = call(case, x, w, u, b, c)
            sharded = (*sharded[:3], *(None if t is None else t.to_local() for t in sharded[3:]))
        else:
            sharded = call(case, x, part(x["w"]), part(x["u"]), part(x["b"]), part(x["c"]),
                           vocab_group=dist.group.WORLD, vocab_start=start)
    loss, log_ratio, dh, dw, db = sharded
    ref_loss, ref_ratio, ref_dh, ref_dw, ref_db = one
    errors = {"loss": relative(loss, ref_loss), "log_ratio": relative(log_ratio, ref_ratio),
              "dh": relative(dh, ref_dh), "dw": relative(dw, part(ref_dw)), "db": relative(db, part(ref_db))}
    # the single-process result against float64: how far fp32 rounding takes these inputs on this
    # machine, the scale of the test's bound
    value, grads64 = float64_reference(case, x)
    errors["single_vs_float64"] = relative(ref_loss, value)
    if not case.get("no_grad"):
        for name, got, want in zip(("dh", "dw", "db"), (ref_dh, ref_dw, ref_db), grads64):
            errors[f"single_{name}_vs_float64"] = relative(got, want)
    rows, widest = case.get("rows", 24), -(-VOCAB // world)
    # nothing wider than this rank's share of the vocabulary: no storage holds more fp32 numbers than
    # a block of every row by V / K columns, or the local head (V / K rows by the hidden size)
    limit = max(rows, HIDDEN, TEACHER_HIDDEN) * widest * 4
    too_large = sorted({(shape, nbytes) for shape, nbytes in tracked.allocated if nbytes > limit})
    return {"errors": errors, "too_large": too_large, "largest": max(n for _, n in tracked.allocated),
            "limit": limit, "rows": rows, "products": len(tracked.products),
            "slice": [start, stop], "dtype": case.get("dtype", "float32"), "loss": float(loss.sum())}


def refusals() -> dict:
    """Calls that must fail on every rank at once, none left waiting in a collective: the error each
    rank raised (or None)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    width = VOCAB // world
    h, targets = torch.randn(4, HIDDEN), torch.randint(0, VOCAB, (4,))
    calls = {
        # every rank claims a slice one row further on: the slices leave gaps
        "bad tiling": lambda: fused_kl_loss(h, h, torch.randn(width, HIDDEN), vocab_group=dist.group.WORLD,
                                            vocab_start=rank * (width + 1)),
        # only the last rank passes a head of the wrong dtype
        "one rank refused": lambda: fused_kl_loss(
            h, h, torch.randn(width, HIDDEN, dtype=torch.float64 if rank == world - 1 else torch.float32),
            vocab_group=dist.group.WORLD, vocab_start=rank * width),
        # a target id past the whole vocabulary (world * width rows)
        "target out of range": lambda: fused_token_logprobs(h, torch.randn(width, HIDDEN), targets * 0 + world * width,
                                                            vocab_group=dist.group.WORLD, vocab_start=rank * width),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def main(out: str) -> None:
    dist.init_process_group("gloo")
    results = {name: run_case(name, case, seed=1000 + i) for i, (name, case) in enumerate(CASES.items())}
    results["refusals"] = refusals()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"vocab": VOCAB, "hidden": HIDDEN, "ranks": gathered}))
    destroy_group()


def destroy_group() -> None:
    """destroy_process_group(), which frees the group (joining its gloo threads) only if nothing
    else holds it, and a check that it did.

    A group that outlives it keeps its gloo threads into the interpreter's finalization, and a
    thread still releasing the tensors of the last collective then (the main thread returned as
    soon as the collective completed) needs the GIL; Python ends such a thread by unwinding it
    through a noexcept destructor: SIGABRT, "terminate called without an active exception", on a
    rank chosen by chance. In torch 2.13 two things hold the group past this point: the functions
    of torch.distributed.nn.functional, whose ``group=group.WORLD`` defaults are evaluated at import
    (the Tracker's first __torch_dispatch__ imports torch._dynamo, which imports it; imported at the
    top of this file, before the group exists, they hold None), and DTensor's sharding-propagation
    caches, which keep every DeviceMesh seen and through it the group (cleared here)."""
    _clear_sharding_prop_cache()
    dist.destroy_process_group()
    left = gloo_threads()
    if left:
        raise RuntimeError(f"gloo threads {left} outlived destroy_process_group(): something still holds the "
                           "process group, and this process would exit racing them")


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo started (read from /proc; none elsewhere)."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            name = task.read_text().strip()
        except OSError:  # a thread that ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


if __name__ == "__main__":
    main(sys.argv[1])
