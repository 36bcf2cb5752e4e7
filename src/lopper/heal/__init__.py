"""Healing after pruning: distillation from the original model or plain fine-tuning, all parameters or LoRA,
through accelerate (so `accelerate launch` scales it). See run.py."""
from .args import HealArgs
from .run import heal

__all__ = ["HealArgs", "heal"]
