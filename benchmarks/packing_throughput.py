"""Packed vs padded training throughput of a real model at long context (forward + backward).

    python -m benchmarks.packing_throughput [--model smollm2-135m] [--context 2048] [--batch 4]

A batch of ``--batch`` sequences with lengths spread between a quarter of ``--context`` and all of
it runs (a) padded to the longest with an attention mask (transformers' sdpa) and (b) packed into
one row with segment-isolated attention (``opsdl.packing``). Tokens/s counts real tokens only.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from opsdl.model import decoder, load_model, packed_hidden_states
from opsdl.packing import pack


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_model(args.model, device=device)
    model.train()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.linspace(args.context // 4, args.context, args.batch).long().tolist()
    seqs = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in lengths]
    real_tokens = sum(lengths)

    def padded_step():
        width = max(lengths)
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        hidden = decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden[mask.bool()].float().pow(2).mean().backward()

    def packed_step():
        hidden = packed_hidden_states(model, pack(seqs, device=device))
        hidden.float().pow(2).mean().backward()

    result = {"model": args.model, "device": device, "lengths": lengths, "real_tokens": real_tokens}
    for name, step in (("padded", padded_step), ("packed", packed_step)):
        seconds = _time(step, args.repeats)
        model.zero_grad(set_to_none=True)
        result[f"{name}_seconds"] = seconds
        result[f"{name}_tokens_per_s"] = real_tokens / seconds
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
