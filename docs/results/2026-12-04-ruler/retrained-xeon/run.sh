#!/usr/bin/env bash
# 2026-12-05, on a second CPU (Intel Xeon with AMX; the first run was on an AMD EPYC with
# AVX512-BF16 and no AMX): the checkpoints of ../train.sh were gone, so its models were trained
# again here with its settings (the pydoc triplets from ../train_logs/, not prepared again), then
# RULER at 4K on each, base included, then 2K, into this folder. Run from the repository root
# where vLLM is installed.
set -uo pipefail
RUNS=${RUNS:-runs/ruler}
OUT=docs/results/2026-12-04-ruler/retrained-xeon
COMMON="--context-tokens 512 --num-examples 256 --steps 30 --batch-size 4 --lr 3e-5 --temperature 0.7
        --max-new-tokens 24 --seed 0 --save-every 5 --save-total-limit 1 --rollout-engine hf --resume"
mkdir -p "$RUNS" && cp docs/results/2026-12-04-ruler/train_logs/prepared-triplets.jsonl "$RUNS/triplets.jsonl"
train() { name=$1; shift; /usr/bin/time -v opsdl train $COMMON --out "$RUNS/$name" "$@"; }
ev() { /usr/bin/time -v opsdl eval --suite ruler --model "$1" --lengths "$2" --samples 20 --seed 0 --engine vllm --out $OUT; }
ck() { echo "$RUNS/$1/checkpoint-000030"; }
train sft --task multikey --objective sft
ev smollm2-135m 4096
ev "$(ck sft)" 4096
train opsdl-prepared --data "$RUNS/triplets.jsonl" --estimator full --teacher frozen
ev "$(ck opsdl-prepared)" 4096
train opsdl-sampled --task multikey --estimator sampled --teacher frozen
ev "$(ck opsdl-sampled)" 4096
train opsdl-paper --task multikey --estimator sampled --teacher live
ev "$(ck opsdl-paper)" 4096
train opsdl-full --task multikey --estimator full --teacher frozen
ev "$(ck opsdl-full)" 4096
for m in sft opsdl-prepared opsdl-sampled opsdl-paper opsdl-full; do ev "$(ck $m)" 2048; done
ev smollm2-135m 2048
