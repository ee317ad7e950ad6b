"""Compile the Triton kernels for real GPUs (no GPU needed) and report each config's shared memory.

Run without TRITON_INTERPRET: ``python -m tests.kernels.compile_for_gpu`` prints one JSON line per
compiled (kernel, variant, generation, config). The interpreter runs kernels as Python and cannot
catch what only the compiler checks (constexpr globals, types, shared memory); this does.
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

ARCH = {"hopper": 90, "ampere": 80, "ampere_small": 86}
SCALARS_I32 = {"N", "V", "H", "HT", "split_size", "num_splits", "v_offset"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*fp32")
        elif name.startswith("stride"):
            sig[name] = "i64"
        elif name in SCALARS_I32:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _variants():
    from opsdl_kernels.triton.configs import BACKWARD_CONFIGS, FORWARD_CONFIGS

    inputs = {k: "*bf16" for k in ("h_ptr", "g_ptr", "w_ptr", "u_ptr", "b_ptr", "c_ptr")}
    inputs["y_ptr"] = "*i64"
    fwd_all = dict(HAS_TEACHER=True, SHARED_WEIGHT=False, HAS_BIAS=True, HAS_TEACHER_BIAS=True,
                   HAS_TARGETS=True, HAS_SOFTCAP=True, ACC_REVERSE=True, ACC_FORWARD=True, DOT_PRECISION="tf32")
    bwd_all = dict(MODE_KL=True, MIX_FORWARD=True, SHARED_WEIGHT=False, HAS_BIAS=True, HAS_TEACHER_BIAS=True,
                   HAS_SOFTCAP=True, COMPUTE_DH=True, COMPUTE_DW=True, COMPUTE_DB=True, FILTER=True,
                   DOT_PRECISION="tf32")
    for gen, configs in FORWARD_CONFIGS.items():
        for cfg in configs:  # every config in its worst case: a separate teacher weight, every flag on
            yield "forward", "separate_teacher", gen, cfg, fwd_all, inputs
    for gen, configs in BACKWARD_CONFIGS.items():
        for cfg in configs:
            yield "backward", "kl_separate_teacher", gen, cfg, bwd_all, inputs
    first = FORWARD_CONFIGS["hopper"][0]
    yield "forward", "shared_weight", "hopper", first, {**fwd_all, "SHARED_WEIGHT": True}, inputs
    yield "forward", "logprobs", "hopper", first, {**fwd_all, "HAS_TEACHER": False, "ACC_REVERSE": False,
                                                   "ACC_FORWARD": False}, inputs
    yield "backward", "reinforce", "hopper", BACKWARD_CONFIGS["hopper"][0], {**bwd_all, "MODE_KL": False,
                                                                             "MIX_FORWARD": False}, inputs
    yield "backward", "kl_shared_fp32", "hopper", BACKWARD_CONFIGS["hopper"][1], {
        **bwd_all, "SHARED_WEIGHT": True, "DOT_PRECISION": "ieee"}, {k: "*fp32" for k in inputs}


def _compile(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opsdl_kernels.triton.backward import grad_kernel
    from opsdl_kernels.triton.forward import kl_forward_kernel

    kernel, variant, gen, cfg, flags, pointers = job
    fn = (kl_forward_kernel if kernel == "forward" else grad_kernel).fn
    # What a launch on contiguous, 16-byte-aligned tensors with H a multiple of 16 specialises:
    # unit strides become constants, pointers and the other strides/sizes carry divisibility 16.
    # Without these hints the loads cannot be vectorised and nothing is pipelined.
    unit_strides = {name: 1 for name in fn.arg_names if name.startswith("stride") and name.endswith("k")}
    constexprs = {**flags, **cfg.kwargs, **unit_strides}
    signature = _signature(fn, {**pointers, "y_ptr": "*i64"}, constexprs)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (signature[name] in ("i32", "i64") and name not in ("N", "V", "v_offset"))}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH[gen], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return {"kernel": kernel, "variant": variant, "gen": gen, "config": cfg.kwargs,
            "num_stages": cfg.num_stages, "shared": compiled.metadata.shared}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this compiles for real GPUs", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile, list(_variants())):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
