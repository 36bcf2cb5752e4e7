"""Qwen3: the Llama layout plus q_norm/k_norm, RMSNorms over each head's head_dim channels.

The per-head norms share one weight of shape [head_dim] across heads, so removing heads leaves them untouched, and
hidden pruning never reaches them (they normalise head channels, not the residual stream). Their epsilon, though,
comes from the same `rms_norm_eps` that hidden pruning scales by r = d/d', so a reloaded checkpoint has eps * r there
too. `set_layer_attrs` makes that exact: RMSNorm(sqrt(r) q) with eps * r equals RMSNorm(q) with eps, so q_proj and
k_proj are scaled by sqrt(r) and the per-head norms get the scaled epsilon (in memory, as the saved config says).
"""
import math

import torch
from torch import nn

from .base import Adapter


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        a = self.attention(layer)
        eps = layer.input_layernorm.variance_epsilon  # the config's rms_norm_eps, scaled if hidden was pruned
        for norm, proj in ((a.q_norm, a.q_proj), (a.k_norm, a.k_proj)):
            ratio = eps / norm.variance_epsilon
            if ratio != 1.0:
                with torch.no_grad():
                    proj.weight.mul_(math.sqrt(ratio))
                    if proj.bias is not None:
                        proj.bias.mul_(math.sqrt(ratio))
                norm.variance_epsilon = eps
