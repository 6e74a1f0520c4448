"""Uptraining through accelerate: token budgets, distillation, LoRA, exact resume.

``uptrain(UptrainOptions(model=..., out=..., fraction=0.05, teacher=...))`` or the CLI
``accelerate launch -m attnzoo uptrain ...`` (see docs/uptrain.md).
"""
from .loop import UptrainResult, plan_budget, uptrain
from .options import DEFAULT_LORA_TARGETS, UptrainOptions

__all__ = ["uptrain", "UptrainOptions", "UptrainResult", "plan_budget", "DEFAULT_LORA_TARGETS"]
