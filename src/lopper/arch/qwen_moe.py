"""Qwen2-MoE (`qwen2_moe`) and Qwen3-MoE (`qwen3_moe`): experts of `moe_intermediate_size` channels, dense MLP layers
of `intermediate_size` where `mlp_only_layers` / `decoder_sparse_step` say so (a layer's kind is decided from its
index when the model is built, so dropping layers rewrites both: see MoEAdapter.config_updates); Qwen2-MoE adds an
always-on shared expert gated by a sigmoid of `shared_expert_gate` ([1, H], a reader of the residual stream), and
Qwen3-MoE per-head q/k RMSNorms (handled as for Qwen3). The router renormalises its top-k weights only when
`norm_topk_prob` is set. Qwen2-MoE's config has no head_dim and transformers 4.57's attention refuses hidden_size !=
heads x head_dim, so hidden or head cuts that break it are saved as a lopper layout (`derived_head_dim`), never as
a config that only transformers 5 reads. See moe.py for the structures."""
from torch import nn

from .base import match_qk_norm_eps
from .moe import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    model_types = ("qwen2_moe",)
    shared = True
    derived_head_dim = True


class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)
    legacy_keys = {"num_experts": "num_local_experts"}

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        match_qk_norm_eps(self.attention(layer), layer.input_layernorm.variance_epsilon, "variance_epsilon")
