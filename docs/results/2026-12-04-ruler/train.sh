#!/usr/bin/env bash
# The trained models of this folder, in the order they were trained (each resumes from its last
# 5-step checkpoint when run again). Settings of docs/results/2026-11-28-cpu: SmolLM2-135M-Instruct,
# 30 AdamW updates of batch 4, lr 3e-5, rollouts at temperature 0.7 with at most 24 new tokens,
# ~512-token contexts, seed 0; compute: this CPU's default (bf16 over float32 master weights).
set -euo pipefail
RUNS=${RUNS:-runs/ruler}
COMMON="--context-tokens 512 --num-examples 256 --steps 30 --batch-size 4 --lr 3e-5 --temperature 0.7
        --max-new-tokens 24 --seed 0 --save-every 5 --save-total-limit 1 --rollout-engine hf --resume"
run() { name=$1; shift; opsdl train $COMMON --out "$RUNS/$name" "$@"; }

multikey() {
  run opsdl-full    --task multikey --estimator full    --teacher frozen   # 2: exact KL, frozen teacher

  run sft           --task multikey --objective sft                        # 4: SFT on the gold answers
  run opsdl-paper   --task multikey --estimator sampled --teacher live     # 5: the paper's estimator and live teacher
  run opsdl-sampled --task multikey --estimator sampled --teacher frozen   # 5: the paper's estimator alone
}

documents() {
  # 3: the paper's data step on real documents, no synthetic task and no answers: CPython's own module
  # documentation (pydoc), the first two ~2,000-character pieces of each module's page (cut at blank lines), questions written by
  # the model itself (opsdl prepare), then the settings of 2.
  python - "$RUNS/docs.jsonl" <<'PY'
import json, pydoc, sys
from opsdl.files import write_atomic
modules = ("argparse collections functools itertools pathlib re string textwrap datetime logging shutil "
           "subprocess threading heapq bisect random statistics json csv sqlite3 zipfile tarfile gzip "
           "hashlib socket asyncio unittest typing dataclasses enum contextlib inspect").split()
docs = []
for name in modules:  # pydoc's sections are indented and their blank lines hold spaces: cut at those
    piece, pieces = "", 0
    for line in pydoc.render_doc(name, renderer=pydoc.plaintext).splitlines():
        piece += line + "\n"
        if not line.strip() and len(piece) >= 2000 and pieces < 2:  # the first two pieces of each module
            docs.append({"id": f"pydoc:{name}:{pieces}", "text": piece.strip()}); piece, pieces = "", pieces + 1
docs = docs[:26]  # 26 documents, ~25 long contexts: what 2 CPU cores could question in this session
write_atomic(sys.argv[1], "".join(json.dumps(d) + "\n" for d in docs))
print(f"{len(docs)} documents")
PY
  [ -f "$RUNS/triplets.jsonl" ] && [ ! -f "$RUNS/triplets.jsonl.progress.json" ] || \
    opsdl prepare --docs "$RUNS/docs.jsonl" --out "$RUNS/triplets.jsonl" --context-tokens 512 \
    --segment-tokens 128 --segments-per-doc 2 --questions-per-segment 1 --pool-size 3 \
    --max-new-tokens 96 --seed 0
  run opsdl-prepared --data "$RUNS/triplets.jsonl" --estimator full --teacher frozen
}

# both (the default), or one of them: `train.sh multikey` and `train.sh documents` ran side by side; then
# opsdl-paper and opsdl-sampled side by side (OMP_NUM_THREADS=1 each)
case "${1:-all}" in
  multikey) multikey ;;
  documents) documents ;;
  all) multikey; documents ;;
  *) echo "usage: train.sh [multikey|documents|all]" >&2; exit 2 ;;
esac
