"""OPSDL for TRL users (``pip install "opsdl[trl]"``).

``OPSDLTrainer`` / ``OPSDLConfig``: OPSDL on TRL's self-distillation machinery, the teacher under
its own short-context prompt, the loss fused (``opsdl_kernels``). ``FusedGKDTrainer``: TRL's GKD
trainer with the same loss computed by the fused kernels instead of from full logits.
"""
from .config import OPSDLConfig
from .gkd import FusedGKDTrainer
from .opsdl_trainer import OPSDLTrainer

__all__ = ["FusedGKDTrainer", "OPSDLConfig", "OPSDLTrainer"]
