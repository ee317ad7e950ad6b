"""What torch.compile makes of each option of the fused loss: graphs and breaks per call, from
``torch._dynamo.explain`` (the test ``tests/kernels/test_compile.py`` asserts one graph, no break).

    python -m benchmarks.compile_explain

Runs on the CPU; the Triton implementation through its interpreter.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from tests.kernels.inputs import make_inputs  # noqa: E402
from tests.kernels.test_compile import KL_OPTIONS, _loss_fn, _split  # noqa: E402


def main() -> int:
    print("| impl | options | graphs | breaks | ops in the graph | break reasons |\n|---|---|---|---|---|---|")
    for impl in ("torch", "triton"):
        for name, options in KL_OPTIONS.items():
            torch._dynamo.reset()
            make, call = _split(options)
            inputs = make_inputs((3, 5), 16, 300, dtype=torch.float32, seed=80, **make)
            explained = torch._dynamo.explain(_loss_fn(call, impl))(inputs)
            reasons = "; ".join(str(r.reason) for r in explained.break_reasons) or "-"
            print(f"| {impl} | {name} | {explained.graph_count} | {explained.graph_break_count} | "
                  f"{explained.op_count} | {reasons} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
