"""Compile the Triton kernels for real GPUs (no GPU needed) and report each variant's shared memory.

Run without TRITON_INTERPRET: ``python -m tests.kernels.compile_for_gpu`` prints one JSON line per
compiled (kernel, variant, generation, config): shared memory, ``bar.sync`` count in the PTX, and
from the cubin (Triton's bundled cuobjdump) registers per thread, stack frame bytes and the number
of local-memory loads/stores in the SASS (spills; 0 when everything lives in registers). The interpreter runs kernels as Python and cannot
catch what only the compiler checks (constexpr globals, types, shared memory, launch
specialisation); this does. Two launch specialisations are imitated: an absent input passed as
None becomes a constexpr None, and an integer argument equal to 1 becomes the constant 1 (the
"ones" variants: every integer argument is 1, so no code may treat one as a tensor).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCH = {"hopper": 90, "ampere": 80, "ampere_small": 86}
INTS = {"N", "V", "H", "HT", "split_size", "plane_stride", "n_rows", "width", "v0", "state_stride", "zs_stride",
        "zt_stride", "grad_stride", "first", "last"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in INTS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _forward_variants():
    from opsdl_kernels.triton_impl.configs import FORWARD_CONFIGS

    pointers = {k: "*bf16" for k in ("h_ptr", "g_ptr", "w_ptr", "u_ptr", "b_ptr", "c_ptr")}
    pointers["y_ptr"] = "*i64"
    every = dict(SHARED_WEIGHT=False, ACC_REVERSE=True, ACC_FORWARD=True, DOT_PRECISION="tf32")
    for gen, configs in FORWARD_CONFIGS.items():
        for cfg in configs:  # every config in its worst case: a separate teacher weight, every input
            yield "forward", "separate_teacher", gen, cfg, every, pointers
    first = FORWARD_CONFIGS["hopper"][0]
    yield "forward", "shared_weight", "hopper", first, {**every, "SHARED_WEIGHT": True, "u_ptr": None}, pointers
    yield "forward", "logprobs", "hopper", first, {**every, "ACC_REVERSE": False, "ACC_FORWARD": False, "g_ptr": None,
                                                   "u_ptr": None, "c_ptr": None, "softcap": None}, pointers
    ones = {name: 1 for name in INTS}  # N = 1 with one vocabulary split: plane_stride = 1
    for gen in ("hopper", "ampere"):
        yield "forward", "ones", gen, FORWARD_CONFIGS[gen][0], {**every, **ones}, pointers
        yield "forward", "ones_no_targets", gen, FORWARD_CONFIGS[gen][0], {**every, **ones, "y_ptr": None}, pointers


def _row_variants():
    import triton

    from opsdl_kernels.triton_impl.configs import ROW_BLOCK, ROW_ROWS, ROW_WARPS

    cfg = triton.Config({"BLOCK_R": ROW_ROWS, "BLOCK_V": ROW_BLOCK}, num_warps=ROW_WARPS, num_stages=1)
    pointers = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "grad_ptr": "*bf16", "bias_ptr": "*bf16",
                "teacher_bias_ptr": "*bf16", "targets_ptr": "*i64", "coef_ptr": "*fp32", "state_ptr": "*fp32"}
    fast = dict(KIND=0, MIX_FORWARD=True, UPDATE=True)
    variants = {
        "fast_kl": fast,
        "fast_sampled": {**fast, "KIND": 1, "MIX_FORWARD": False, "softcap": None},
        "fast_logprob": {**fast, "KIND": 2, "MIX_FORWARD": False, "zt_ptr": None, "teacher_bias_ptr": None},
        "lean_forward": {**fast, "grad_ptr": None, "coef_ptr": None},
        "lean_backward_kl": {**fast, "UPDATE": False},
        "lean_backward_sampled": {**fast, "KIND": 1, "MIX_FORWARD": False, "UPDATE": False, "zt_ptr": None,
                                  "teacher_bias_ptr": None},
        "no_optional_inputs": {**fast, "MIX_FORWARD": False, "bias_ptr": None, "teacher_bias_ptr": None,
                               "targets_ptr": None, "coef_ptr": None, "softcap": None},
    }
    for gen in ARCH:
        for name, flags in variants.items():
            yield "rows", name, gen, cfg, flags, pointers
        yield "rows", "ones", gen, cfg, {**fast, **{name: 1 for name in INTS}}, pointers
        yield "rows", "fp32_grad", gen, cfg, fast, {**pointers, "grad_ptr": "*fp32"}
        yield "rows", "odd_width", gen, cfg, fast, pointers  # V not a multiple of 16: unvectorised loads


def resources(cubin: bytes) -> dict:
    """Registers, stack bytes and local loads/stores (``LDL``/``STL`` in the SASS) of a one-kernel cubin."""
    from triton import knobs

    cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], check=True, capture_output=True, text=True).stdout
    figures = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"registers": int(figures["REG"]), "stack": int(figures["STACK"]), "local": int(figures["LOCAL"]),
            "local_loads": len(re.findall(r"\bLDL\b", sass)), "local_stores": len(re.findall(r"\bSTL\b", sass))}


def _compile(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opsdl_kernels.triton_impl.forward import kl_forward_fn
    from opsdl_kernels.triton_impl.rows import logit_rows_kernel

    kernel, variant, gen, cfg, flags, pointers = job
    fn = kl_forward_fn if kernel == "forward" else logit_rows_kernel
    # What a launch on contiguous, 16-byte-aligned tensors with H a multiple of 16 specialises:
    # unit strides become constants, pointers and the other strides/sizes carry divisibility 16.
    # Without these hints the loads cannot be vectorised and nothing is pipelined.
    unit_strides = {name: 1 for name in fn.arg_names if name.startswith("stride") and name.endswith("k")}
    constexprs = {k: v for k, v in {**unit_strides, **flags, **cfg.kwargs}.items() if k in fn.arg_names}
    signature = _signature(fn, pointers, constexprs)
    # Real vocabularies (32000, 49152, 128256, 151936, 152064, 256000) and our slabs are multiples of
    # 16 columns, so a launch marks the row kernel's width divisible by 16 and its loads vectorise.
    # What the kernel declares it never specialises on (rows.py), a launch never assumes.
    plain = ({"N", "V", "n_rows", "v0", "first", "last", "state_stride", "state_ptr", "targets_ptr", "coef_ptr"}
             | ({"width"} if variant == "odd_width" else set()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if (signature[name].startswith("*") or signature[name] in ("i32", "i64")) and name not in plain}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH[gen], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return {"kernel": kernel, "variant": variant, "gen": gen, "config": cfg.kwargs, "num_stages": cfg.num_stages,
            "shared": compiled.metadata.shared, "grad": pointers.get("grad_ptr") if "grad_ptr" not in flags else None,
            "barriers": compiled.asm["ptx"].count("bar.sync"), **resources(compiled.asm["cubin"])}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this compiles for real GPUs", file=sys.stderr)
        return 2
    jobs = [*_forward_variants(), *_row_variants()]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
