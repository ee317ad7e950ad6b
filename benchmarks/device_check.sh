#!/usr/bin/env bash
# One command for a GPU machine: the headline shape for every provider and the gradient error against
# float64 first (so a run cut short still has them), then the kernel tests with compiled Triton (and
# the packed-attention tests on CUDA), then the rest of the benchmark grid, then a report (markdown +
# JSON + PNG) in the output folder.
#
#   benchmarks/device_check.sh [OUT_DIR]         OUT_DIR defaults to $OUT, else benchmarks/results/<date>
#   benchmarks/device_check.sh --cpu-dry-run DIR walk every step on a CPU (interpreted kernels,
#                                                CPU benchmark shapes): for checking the script itself
#
# Budget: at most 8 minutes on an H100/H200 (headline <= 3 min, tests <= 2.5 min, grid <= 4 min as
# timeouts; about 6 expected). liger-kernel is installed from wheels in .whl/ when it is missing (benchmarks/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
if [ "${1:-}" = "--cpu-dry-run" ]; then dry_run=1; shift; fi
out="${1:-${OUT:-benchmarks/results/$(date +%Y-%m-%d)}}"
mkdir -p "$out"
py=${PYTHON:-python3}

if [ "$dry_run" = 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA device is visible to $py (torch.cuda.is_available() is False)." >&2
    echo "device_check: this script measures GPU kernels and refuses to run without one;" >&2
    echo "device_check: use --cpu-dry-run DIR to walk its steps on a CPU." >&2
    exit 2
fi

# liger-kernel (the peers) and pytest-xdist + execnet (the kernel tests in parallel processes: each
# new kernel variant is a compile, about 150 of them) come from wheels carried in .whl/ when missing.
if ! "$py" -c "import liger_kernel, xdist" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "device_check: installing $(ls .whl | tr '\n' ' ')from .whl/"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/opsdl-site .whl/*.whl \
            && export PYTHONPATH="/tmp/opsdl-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "device_check: liger-kernel or pytest-xdist is missing and .whl/ holds no wheels: Liger providers will be"
        echo "device_check: reported as unmeasured, and the kernel tests run in one process"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1
    test_cmd=("$py" -m pytest tests/kernels -q -x -p no:cacheprovider --deselect tests/kernels/test_gpu_compile.py)
else
    export OPSDL_TEST_DEVICE=cuda TRITON_INTERPRET=0
    test_cmd=("$py" -m pytest tests/kernels tests/trainer/test_packing.py -q -p no:cacheprovider --durations=10)
    if "$py" -c "import xdist" 2>/dev/null; then
        test_cmd+=(-n 8)
    fi
fi
bench=("$py" -m pytest -q -p no:cacheprovider)
# Every measurement is appended to rows.jsonl as it is made, so a step stopped by its time limit
# keeps what it measured; the report reads that file.
export OPSDL_BENCH_ROWS="$out/rows.jsonl"
rm -f "$OPSDL_BENCH_ROWS"

echo "device_check: [1/4] headline shape, every provider, and gradient error vs float64 -> $out/headline.log"
OPSDL_BENCH_SHAPES=headline timeout 180 "${bench[@]}" \
    benchmarks/test_providers_agree.py benchmarks/test_kl_speed_memory.py benchmarks/test_accuracy.py \
    > "$out/headline.log" 2>&1
echo "device_check: headline exit $? ($(grep -E ' passed| failed' "$out/headline.log" | tail -1))"

echo "device_check: [2/4] kernel tests -> $out/tests.log"
timeout 150 "${test_cmd[@]}" > "$out/tests.log" 2>&1
echo "device_check: kernel tests exit $? ($(grep -E ' passed| failed' "$out/tests.log" | tail -1))"

echo "device_check: [3/4] the rest of the grid -> $out/grid.log"
OPSDL_BENCH_SHAPES=rest timeout 240 "${bench[@]}" benchmarks/test_kl_speed_memory.py > "$out/grid.log" 2>&1
echo "device_check: grid exit $? ($(grep -E ' passed| failed' "$out/grid.log" | tail -1))"

echo "device_check: [4/4] report"
"$py" -m benchmarks.report "$out/rows.jsonl" --out "$out" --tests-log "$out/tests.log"
