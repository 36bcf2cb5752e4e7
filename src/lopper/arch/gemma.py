"""Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`): the Llama layout with four RMSNorms per layer, a head_dim of
its own (not hidden / heads), an embedding scaled by sqrt(hidden_size), soft-capping and per-layer `layer_types`.

Sandwich norms: input_layernorm and pre_feedforward_layernorm read the residual stream; post_attention_layernorm and
post_feedforward_layernorm read the block outputs (o_proj / down_proj rows) and write into the stream. All four are
over hidden channels, so hidden pruning cuts and rescales all four; with the writers' removed rows zeroed, each norm
sees zeros on removed channels in the masked model, which is what makes masked == pruned exact.

Gemma's RMSNorm computes x_hat * (1 + weight): the hidden-pruning rescale by s = sqrt(d/d') is (1 + w') = (1 + w) * s,
i.e. w' = (1 + w) * s - 1 (`scale_norm`). The embedding normalizer sqrt(hidden_size) is recomputed from the config at
load time, so a hidden cut multiplies the embedding weights by sqrt(d/d') and sets the in-memory normalizer to
sqrt(d') (`after_hidden_cut`); with tied embeddings that also scales lm_head, which the final norm undoes.
Soft-capping (attention and final logits) and query_pre_attn_scalar do not depend on any width.

Gemma 3's q_norm / k_norm share the rms_norm_eps that hidden pruning scales: handled as for Qwen3 (q/k projections
scaled by sqrt(r), the per-head norms get the scaled epsilon). The config requires hidden_size % heads == 0 and one
`layer_types` entry per layer (`config_updates` keeps the kept layers' types; `check_config` asks the class).
"""
import math

from torch import nn

from .base import Adapter, match_qk_norm_eps


class GemmaAdapter(Adapter):
    model_types = ("gemma2", "gemma3_text")

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm]

    def writes_residual(self) -> bool:
        return False  # post_attention_layernorm / post_feedforward_layernorm stand between writers and stream

    def scale_norm(self, norm: nn.Module, s: float) -> None:
        norm.weight.add_(1.0).mul_(s).sub_(1.0)

    def after_hidden_cut(self, ratio: float) -> None:
        embed = self.embeddings()[0]
        if not hasattr(embed, "embed_scale"):  # not a scaled embedding: nothing derives from hidden_size
            return
        embed.weight.mul_(math.sqrt(ratio))
        new_scale = embed.weight.shape[1] ** 0.5
        embed.scalar_embed_scale = new_scale
        embed.embed_scale.fill_(new_scale)
        head = self.lm_head()
        if head is not None and head.weight is embed.weight:  # tied: lm_head got the same factor
            for norm in self.final_norms():
                self.scale_norm(norm, 1 / math.sqrt(ratio))

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
        a = self.attention(layer)
        if not hasattr(a, "q_norm"):  # Gemma 2
            return
        match_qk_norm_eps(a, layer.input_layernorm.eps, "eps")  # the config's rms_norm_eps, scaled if cut
