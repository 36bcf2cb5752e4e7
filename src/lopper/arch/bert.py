"""BERT-family encoders: BERT, RoBERTa, MiniLM (post-norm, LayerNorm with bias, learned positions).

transformers' BertSelfAttention derives the head size as hidden_size // num_attention_heads and has no `head_dim`
option (and `prune_heads`/`pruned_heads` are gone in transformers 5), so a BERT with fewer heads than
hidden_size / head_size cannot be described by a plain BertConfig. Depth and MLP width give standard checkpoints;
heads and hidden width give a checkpoint that `lopper.load()` rebuilds from the saved plan (see `check_config`).
Hidden pruning is not exactly mask-equivalent here: LayerNorm's mean and variance run over the kept channels.
"""
from torch import nn

from .base import Adapter, Part


class BertAdapter(Adapter):
    model_types = ("bert", "roberta")
    is_encoder = True
    has_kv_groups = False
    rms_norm = False

    def layers(self) -> nn.ModuleList:
        return self.backbone().encoder.layer

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.backbone().encoder.layer = nn.ModuleList(layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attention.self

    def head_dim(self) -> int:
        return self.attention(self.layers()[0]).attention_head_size

    def embeddings(self) -> list[nn.Embedding]:
        e = self.backbone().embeddings
        return [m for m in (e.word_embeddings, e.position_embeddings, getattr(e, "token_type_embeddings", None))
                if m is not None]

    def lm_head(self):
        return None

    def final_norms(self) -> list[nn.Module]:
        return [self.backbone().embeddings.LayerNorm]

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.attention.output.LayerNorm, layer.output.LayerNorm]

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.intermediate.dense]

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return layer.output.dense

    def head_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        return [Part(a.query, 0, block=d), Part(a.key, 0, block=d), Part(a.value, 0, block=d),
                Part(layer.attention.output.dense, 1, block=d)]

    def kv_parts(self, layer: nn.Module) -> list[Part]:
        return []

    def readers(self, layer: nn.Module) -> list[nn.Linear]:
        a = self.attention(layer)
        return [a.query, a.key, a.value, layer.intermediate.dense]

    def writers(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.attention.output.dense, layer.output.dense]

    def hidden_parts(self) -> list[Part]:
        parts = super().hidden_parts()
        pooler = getattr(self.backbone(), "pooler", None)
        if pooler is not None:
            parts += [Part(pooler.dense, 0), Part(pooler.dense, 1)]
        return parts

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        a = self.attention(layer)
        a.num_attention_heads = self.layer_widths(layer)["heads"]
        a.all_head_size = a.num_attention_heads * a.attention_head_size
        if hasattr(a, "layer_idx"):
            a.layer_idx = index

    def config_updates(self, widths: dict[str, int], kept_layers: list[int], hidden_before: int) -> dict:
        return {"num_hidden_layers": len(kept_layers), "num_attention_heads": widths["heads"],
                "intermediate_size": widths["mlp"], "hidden_size": widths["hidden"]}

    def check_config(self, updates: dict) -> str | None:
        problem = super().check_config(updates)
        if problem:
            return problem
        if updates["hidden_size"] != updates["num_attention_heads"] * self.head_dim():
            return (f"{type(self.config).__name__} derives the head size from hidden_size / num_attention_heads, so "
                    f"{updates['num_attention_heads']} heads of {self.head_dim()} need hidden_size "
                    f"{updates['num_attention_heads'] * self.head_dim()}, not {updates['hidden_size']}")
        return None
