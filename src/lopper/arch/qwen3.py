"""Qwen3: the Llama layout plus q_norm/k_norm, RMSNorms over each head's head_dim channels.

The per-head norms share one weight of shape [head_dim] across heads, so removing heads leaves them untouched, and
hidden pruning never reaches them (they normalise head channels, not the residual stream).
"""
from .base import Adapter


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)
