"""Compile the Triton kernels for real GPUs (no GPU needed) and report what each variant takes.

Run without TRITON_INTERPRET: ``python -m tests.kernels.compile_for_gpu [--kernels K,..] [--gens G,..]
[--variants V,..]`` prints one JSON line per compiled (kernel, variant, generation, config): shared
memory, ``bar.sync`` instructions in the PTX (all, and inside loops), and from the cubin (Triton's
bundled cuobjdump) registers per thread, stack frame bytes and local-memory loads/stores in the SASS
(spills: none when everything lives in registers). The interpreter runs kernels as Python and cannot
catch what only the compiler checks (constexpr globals, types, shared memory, launch
specialisation, registers); this does. Two launch specialisations are imitated: an absent input
passed as None becomes a constexpr None, and an integer argument equal to 1 becomes the constant 1
(the "ones" variants: every integer argument is 1, so no code may treat one as a tensor).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCH = {"hopper": 90, "ampere": 80, "ampere_small": 86}
INTS = {"N", "V", "H", "HT", "split_size", "plane_stride", "n_bucket", "n_rows", "width", "v0", "state_stride",
        "zs_stride", "zt_stride", "grad_stride", "first", "last"}


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
    from opsdl_kernels.triton_impl.configs import FALLBACK_CONFIG, FORWARD_CONFIGS

    pointers = {k: "*bf16" for k in ("h_ptr", "g_ptr", "w_ptr", "u_ptr", "b_ptr", "c_ptr")}
    pointers["y_ptr"] = "*i64"
    every = dict(SHARED_WEIGHT=False, ACC_REVERSE=True, ACC_FORWARD=True, DOT_PRECISION="tf32")
    for gen, configs in FORWARD_CONFIGS.items():
        for cfg in configs:  # every config in its worst case: a separate teacher weight, every input
            yield "forward", "separate_teacher", gen, cfg, every, pointers
    yield "forward", "fallback", "ampere_small", FALLBACK_CONFIG, every, pointers
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

    from opsdl_kernels.triton_impl.configs import GRAD_BLOCK, ROW_ROWS, ROW_WARPS, STATE_BLOCK

    launch = {kernel: triton.Config({"BLOCK_R": ROW_ROWS, "BLOCK_V": block}, num_warps=ROW_WARPS, num_stages=1)
              for kernel, block in (("row_state", STATE_BLOCK), ("row_grad", GRAD_BLOCK))}
    pointers = {"zs_ptr": "*fp32", "zt_ptr": "*fp32", "grad_ptr": "*bf16", "bias_ptr": "*bf16",
                "teacher_bias_ptr": "*bf16", "targets_ptr": "*i64", "coef_ptr": "*fp32", "state_ptr": "*fp32"}
    no_teacher = {"zt_ptr": None, "teacher_bias_ptr": None}
    no_options = {"bias_ptr": None, "teacher_bias_ptr": None, "targets_ptr": None, "softcap": None}
    state = {  # row_state: the KL mixing both directions, one direction (also the sampled estimator), log-probs
        "kl_mixed": dict(MIX_FORWARD=True),
        "teacher": dict(MIX_FORWARD=False),
        "logprob": dict(MIX_FORWARD=False, **no_teacher),
        "no_optional_inputs": dict(MIX_FORWARD=True, **no_options),
    }
    grad = {  # row_grad: the teacher's logits are passed for the exact KL only
        "kl_bf16": dict(KIND=0, MIX_FORWARD=True),
        "sampled": dict(KIND=1, MIX_FORWARD=False, **no_teacher),
        "logprob": dict(KIND=2, MIX_FORWARD=False, **no_teacher),
        "no_optional_inputs": dict(KIND=0, MIX_FORWARD=True, coef_ptr=None, **no_options),
    }
    ones = {name: 1 for name in INTS}
    for gen in ARCH:
        for kernel, variants in (("row_state", state), ("row_grad", grad)):
            cfg, first = launch[kernel], next(iter(variants.values()))
            for name, flags in variants.items():
                yield kernel, name, gen, cfg, flags, pointers
            yield kernel, "ones", gen, cfg, {**first, **ones}, pointers
            yield kernel, "odd_width", gen, cfg, first, pointers  # V not a multiple of 16: unvectorised loads
        # fp32 inputs: an fp32 G over the logits, fp32 biases
        fp32 = {**pointers, "grad_ptr": "*fp32", "bias_ptr": "*fp32", "teacher_bias_ptr": "*fp32"}
        yield "row_grad", "kl_fp32", gen, launch["row_grad"], grad["kl_bf16"], fp32


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


def loop_barriers(ptx: str) -> int:
    """``bar.sync`` instructions inside loops: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\$L__BB\w+):", line))}
    inside = set()
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);", line)
        if m and labels.get(m.group(1), i) < i:
            inside.update(j for j in range(labels[m.group(1)], i) if "bar.sync" in lines[j])
    return len(inside)


def _compile(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from opsdl_kernels.triton_impl.forward import kl_forward_fn
    from opsdl_kernels.triton_impl.rows import row_grad_kernel, row_state_kernel

    kernel, variant, gen, cfg, flags, pointers = job
    fn = {"forward": kl_forward_fn, "row_state": row_state_kernel, "row_grad": row_grad_kernel}[kernel]
    # What a launch on contiguous, 16-byte-aligned tensors with H a multiple of 16 specialises:
    # unit strides become constants, pointers and the other strides/sizes carry divisibility 16.
    # Without these hints the loads cannot be vectorised and nothing is pipelined.
    unit_strides = {name: 1 for name in fn.arg_names if name.startswith("stride") and name.endswith("k")}
    constexprs = {k: v for k, v in {**unit_strides, **flags, **cfg.kwargs}.items() if k in fn.arg_names}
    signature = _signature(fn, pointers, constexprs)
    # Real vocabularies (32000, 49152, 128256, 151936, 152064, 256000) and our slabs are multiples of
    # 16 columns, so a launch marks the row kernel's width divisible by 16 and its loads vectorise.
    # What the kernel declares it never specialises on (rows.py), a launch never assumes.
    plain = ({"N", "V", "n_bucket", "n_rows", "v0", "first", "last", "state_stride", "state_ptr", "targets_ptr",
              "coef_ptr"}
             | ({"width"} if variant == "odd_width" else set()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if (signature[name].startswith("*") or signature[name] in ("i32", "i64")) and name not in plain}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH[gen], 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    grad = pointers["grad_ptr"] if "grad_ptr" in fn.arg_names and "grad_ptr" not in flags else None
    return {"kernel": kernel, "variant": variant, "gen": gen, "config": cfg.kwargs, "num_stages": cfg.num_stages,
            "shared": compiled.metadata.shared, "grad": grad,
            "barriers": compiled.asm["ptx"].count("bar.sync"), "loop_barriers": loop_barriers(compiled.asm["ptx"]),
            **resources(compiled.asm["cubin"])}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", help="comma-separated: forward, row_state, row_grad (default all)")
    parser.add_argument("--gens", help="comma-separated: " + ", ".join(ARCH) + " (default all)")
    parser.add_argument("--variants", help="comma-separated variant names (default all)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this compiles for real GPUs", file=sys.stderr)
        return 2
    wanted = [None if x is None else set(x.split(",")) for x in (args.kernels, args.variants, args.gens)]
    jobs = [job for job in (*_forward_variants(), *_row_variants())
            if all(w is None or value in w for w, value in zip(wanted, job[:3]))]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
