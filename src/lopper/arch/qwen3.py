"""Qwen3: the Llama layout plus q_norm/k_norm, RMSNorms over each head's head_dim channels.

The per-head norms share one weight of shape [head_dim] across heads, so removing heads leaves them untouched, and
hidden pruning never reaches them (they normalise head channels, not the residual stream). Their epsilon, though,
comes from the same `rms_norm_eps` that hidden pruning scales by r = d/d', so a reloaded checkpoint has eps * r there
too. `set_layer_attrs` makes that exact: RMSNorm(sqrt(r) q) with eps * r equals RMSNorm(q) with eps, so q_proj and
k_proj are scaled by sqrt(r) and the per-head norms get the scaled epsilon (in memory, as the saved config says).
"""
from torch import nn

from .base import Adapter, match_qk_norm_eps


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        match_qk_norm_eps(self.attention(layer), layer.input_layernorm.variance_epsilon, "variance_epsilon")
