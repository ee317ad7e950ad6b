#!/usr/bin/env bash
# One command for a GPU machine: kernel tests with compiled Triton (and the packed-attention tests on
# CUDA), then the benchmark grid, then a
# report (markdown + JSON + PNG) in the output folder.
#
#   benchmarks/device_check.sh [OUT_DIR]         OUT_DIR defaults to $OUT, else benchmarks/results/<date>
#   benchmarks/device_check.sh --cpu-dry-run DIR walk every step on a CPU (interpreted kernels,
#                                                CPU benchmark shapes): for checking the script itself
#
# Budget: about 8 minutes on an H100/H200 (tests <= 3 min, benchmarks <= 4.5 min, each step with a
# timeout). liger-kernel is installed from wheels in .whl/ when it is missing (benchmarks/README.md).
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

if ! "$py" -c "import liger_kernel" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        echo "device_check: installing liger-kernel from .whl/"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/opsdl-site .whl/*.whl \
            && export PYTHONPATH="/tmp/opsdl-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "device_check: liger-kernel is missing and .whl/ holds no wheels: Liger providers will be reported as unmeasured"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

if [ "$dry_run" = 1 ]; then
    export TRITON_INTERPRET=1
    test_cmd=("$py" -m pytest tests/kernels -q -x -p no:cacheprovider --deselect tests/kernels/test_gpu_compile.py)
else
    export OPSDL_TEST_DEVICE=cuda TRITON_INTERPRET=0
    test_cmd=("$py" -m pytest tests/kernels tests/trainer/test_packing.py -q -p no:cacheprovider)
fi

echo "device_check: [1/3] kernel tests -> $out/tests.log"
timeout 180 "${test_cmd[@]}" > "$out/tests.log" 2>&1
echo "device_check: kernel tests exit $? ($(grep -E ' passed| failed' "$out/tests.log" | tail -1))"

echo "device_check: [2/3] benchmark grid -> $out/benchmark.json"
OPSDL_BENCH_UNMEASURED="$out/unmeasured.json" timeout 270 "$py" -m pytest benchmarks -q -p no:cacheprovider \
    --benchmark-json="$out/benchmark.json" > "$out/benchmarks.log" 2>&1
echo "device_check: benchmarks exit $? ($(grep -E ' passed| failed' "$out/benchmarks.log" | tail -1))"

echo "device_check: [3/3] report"
"$py" -m benchmarks.report "$out/benchmark.json" --out "$out" --unmeasured "$out/unmeasured.json" \
    --tests-log "$out/tests.log"
