#!/usr/bin/env bash
# OPSDL on TRL on a GPU, in one prepared run (work order #21): OPSDLTrainer (fused reverse KL on hidden
# states) against TRL's SDFTTrainer with full logits, random:qwen2.5-1.5b in bf16, two steps each,
# peak memory of each (benchmarks.trl_opsdl_memory).
#
#   benchmarks/gpu_trl_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else benchmarks/results/<date>-gpu-trl
#
# Needs trl, peft, datasets and accelerate importable (pip install -e ".[trl]"). The tokenizer comes from
# a saved folder (OPSDL_TOKENIZER, default .gpu/tokenizer, as benchmarks/gpu_trainer_check.sh says how to
# write it). OPSDL_MODEL and OPSDL_DEVICE change model and device (a CPU dry run: OPSDL_MODEL=tiny:qwen2
# OPSDL_DEVICE=cpu OPSDL_BF16=--no-bf16). Budget: about 3 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-benchmarks/results/$(date +%Y-%m-%d)-gpu-trl}}"
model="${OPSDL_MODEL:-random:qwen2.5-1.5b}"
device="${OPSDL_DEVICE:-cuda}"
tokenizer="${OPSDL_TOKENIZER:-.gpu/tokenizer}"
bf16="${OPSDL_BF16:---bf16}"
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! "$py" -c "import trl, peft, datasets, accelerate" 2>/dev/null; then
    echo "gpu_trl_check: trl, peft, datasets or accelerate is missing for $py: pip install -e \".[trl]\"" >&2
    exit 2
fi
echo "gpu_trl_check: OPSDLTrainer vs SDFTTrainer (full logits), two steps each -> $out/trl_opsdl_memory.json"
timeout 300 "$py" -m benchmarks.trl_opsdl_memory --model "$model" --tokenizer "$tokenizer" "$bf16" \
    --device "$device" --out "$out/trl_opsdl_memory.json" 2>&1 | tee "$out/trl_opsdl_memory.log" | grep -v Warning
echo "gpu_trl_check: exit ${PIPESTATUS[0]}"
