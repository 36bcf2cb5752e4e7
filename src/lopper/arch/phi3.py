"""Phi-3 (`phi3`): the Llama layout with two fused projections, described by Part offsets only.

qkv_proj rows are [q heads (H*d) | k heads (K*d) | v heads (K*d)]: a query head is a `head_dim` block at offset 0 (and
its o_proj columns), a KV group a block at offset H*d plus one at H*d + K*d. gate_up_proj rows are
[gate (I) | up (I)], which Phi3MLP splits with chunk(2): an MLP channel is row j and row I + j, and down_proj column j.

Phi3Config has no head_dim field (the attention reads `getattr(config, "head_dim", hidden / heads)`), so a cut that
changes hidden / heads writes head_dim into the config; Phi3Attention finds the query block by reading
`config.num_attention_heads` in forward(), so in a lopper layout (widths differing between layers, config unchanged)
each attention gets a view of the config with its own head count (`finish`). Configs with longrope short/long factors
validate their length against hidden_size / num_attention_heads; `check_config` reports such a refusal.
"""
from torch import nn

from .base import Adapter, ConfigView, Part


class Phi3Adapter(Adapter):
    model_types = ("phi3",)

    def head_dim(self) -> int:
        return self.attention(self.layers()[0]).head_dim

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_up_proj]

    def _counts(self, layer: nn.Module) -> tuple[int, int]:
        a, d = self.attention(layer), self.head_dim()
        heads = a.o_proj.weight.shape[1] // d
        return heads, (a.qkv_proj.weight.shape[0] - heads * d) // (2 * d)

    def head_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        return [Part(a.qkv_proj, 0, block=d), Part(a.o_proj, 1, block=d)]

    def kv_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        heads, kv = self._counts(layer)
        return [Part(a.qkv_proj, 0, offset=heads * d, block=d), Part(a.qkv_proj, 0, offset=(heads + kv) * d, block=d)]

    def mlp_parts(self, layer: nn.Module) -> list[Part]:
        inner = layer.mlp.down_proj.weight.shape[1]
        return [Part(layer.mlp.gate_up_proj, 0), Part(layer.mlp.gate_up_proj, 0, offset=inner),
                Part(layer.mlp.down_proj, 1)]

    def readers(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.attention(layer).qkv_proj, layer.mlp.gate_up_proj]

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        heads, kv = self._counts(layer)
        return {"heads": heads, "mlp": layer.mlp.down_proj.weight.shape[1], "kv_heads": kv}

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        a = self.attention(layer)
        a.num_key_value_heads = self._counts(layer)[1]
        if isinstance(a.config, ConfigView):  # a previous lopper layout's view; `finish` makes a new one if needed
            a.config = self.config

    def finish(self, standard: bool) -> None:
        super().finish(standard)
        if standard:
            return
        for layer in self.layers():
            heads = self._counts(layer)[0]
            if heads != self.config.num_attention_heads:
                self.attention(layer).config = ConfigView(self.config, num_attention_heads=heads)
