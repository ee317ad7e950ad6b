"""Memory per GPU of a sharded OPSDL run (``torchrun ... -m opsdl train``), computed from a model's shape.

    python -m benchmarks.fsdp_memory --model random:qwen2.5-7b --gpus 8 --tokens 16384

An accounting, not a measurement: the terms FSDP2 and the trainer hold, for float32 weights that
compute in bf16 (``--bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), a
frozen teacher, gradient checkpointing and AdamW. Parameter counts come from the model built on
the meta device. ``--tokens`` is each rank's packed student tokens per micro-batch.

Sharded over the K ranks, always held: weights, gradients (fp32), AdamW's two moments (fp32) and
the frozen teacher (fp32): 20 bytes per parameter / K.
Training phase, on top: the root (embeddings and lm-head, bf16) of the student, and of the
teacher while the loss reads its head; two decoder layers gathered (the one running and the one
prefetched) with one layer's fp32 gradient before its reduce-scatter; the checkpointed inputs of
every layer (T x H, bf16) and one layer's recomputed activations; the fused loss's working memory
(``memory_budget``, 1 GiB) and the lm-head gradient it writes (V x H).
Rollout phase (``--rollout-gather once``), instead: the whole model in bf16 and the KV cache of
the prompts' T tokens.
"""
from __future__ import annotations

import argparse
import json

GIB = 2**30


def shape_terms(model_name: str) -> dict:
    """Parameter counts of a ``random:`` shape, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from opsdl.model import REAL_SHAPES

    family, fields = REAL_SHAPES[model_name.removeprefix("random:")]
    config = AutoConfig.for_model(family, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"parameters": total, "layer_parameters": layer, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "intermediate": config.intermediate_size, "vocab": config.vocab_size,
            "tied": bool(config.tie_word_embeddings), "kv_width": config.num_key_value_heads * head_dim,
            "root_parameters": total - layer * config.num_hidden_layers}


def per_gpu(terms: dict, gpus: int, tokens: int, loss_budget_gib: float = 1.0) -> dict:
    """GiB per GPU, term by term; ``peak`` is the sharded state plus the larger phase."""
    p, h, v, t = terms["parameters"], terms["hidden"], terms["vocab"], tokens
    bf16, fp32 = 2, 4
    sharded = {"weights_fp32": fp32 * p / gpus, "gradients_fp32": fp32 * p / gpus, "adamw_fp32": 2 * fp32 * p / gpus,
               "frozen_teacher_fp32": fp32 * p / gpus}
    layer = terms["layer_parameters"]
    recompute = t * (4 * h + 2 * terms["kv_width"] + 3 * terms["intermediate"]) * bf16
    training = {"roots_gathered_bf16": 2 * terms["root_parameters"] * bf16,
                "two_layers_gathered_bf16": 2 * layer * bf16, "one_layer_gradient_fp32": layer * fp32,
                "checkpointed_layer_inputs_bf16": terms["layers"] * t * h * bf16,
                "one_layer_recompute_bf16": recompute,
                "loss_working_memory": loss_budget_gib * GIB, "lm_head_gradient_bf16": v * h * bf16}
    rollout = {"whole_model_bf16": p * bf16, "kv_cache_bf16": 2 * terms["layers"] * t * terms["kv_width"] * bf16}
    gib = lambda d: {k: round(x / GIB, 2) for k, x in d.items()}  # noqa: E731
    state, train_phase, rollout_phase = (sum(d.values()) / GIB for d in (sharded, training, rollout))
    return {"sharded": gib(sharded), "training": gib(training), "rollout": gib(rollout),
            "sharded_gib": round(state, 2), "training_gib": round(train_phase, 2),
            "rollout_gib": round(rollout_phase, 2), "peak_gib": round(state + max(train_phase, rollout_phase), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen2.5-7b,random:qwen2.5-1.5b",
                        help="comma-separated random:<shape> names")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args(argv)
    for name in args.model.split(","):
        terms = shape_terms(name)
        print(json.dumps({"model": name, "gpus": args.gpus, "tokens_per_gpu": args.tokens,
                          "parameters": terms["parameters"], **per_gpu(terms, args.gpus, args.tokens)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
