"""One OPSDLTrainer step on SmolLM2-135M in a fresh process; prints its peak memory (MiB) as JSON.

    python trl_peft_memory_worker.py peft   # LoRA; the frozen teacher: the base with adapters disabled
    python trl_peft_memory_worker.py copy   # the same LoRA run, the teacher a full copy of the base weights
                                            # (what a trainer holds that cannot disable the adapters)
"""
import copy
import json
import sys
import tempfile

import torch

from datasets import Dataset
from peft import LoraConfig

from opsdl.integrations.trl import OPSDLConfig, OPSDLTrainer
from opsdl.model import load_model
from opsdl.steps import peak_memory_mib

mode = sys.argv[1]
model, tokenizer = load_model("smollm2-135m")
weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
data = Dataset.from_list([{"long_context": "Some notes. " * 40 + "The code is 4417.", "short_context": "The code is 4417.",
                           "question": "What is the code?"}] * 2)
with tempfile.TemporaryDirectory() as out:
    args = OPSDLConfig(output_dir=out, per_device_train_batch_size=2, max_completion_length=4, max_steps=1,
                       report_to=[], use_cpu=True, save_strategy="no", fused_impl="torch")
    base_copy = copy.deepcopy(model).requires_grad_(False).eval() if mode == "copy" else None
    trainer = OPSDLTrainer(model, args=args, train_dataset=data, processing_class=tokenizer,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if base_copy is not None:  # the teacher: the copy, read as it is (no adapter to switch off)
        trainer.teacher_model, trainer.args.teacher_model_kind = base_copy, "live"
    trainer.train()
peak_mib = peak_memory_mib(torch.device("cpu"))  # VmHWM: this process's own, not its parent's
print(json.dumps({"mode": mode, "peak_mib": peak_mib, "weights_mib": weights_mib}))
