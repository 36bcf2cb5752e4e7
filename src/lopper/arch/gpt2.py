"""GPT-2 (`gpt2`): pre-norm LayerNorms with bias (ln_1, ln_2, ln_f), learned positions (wpe), lm_head tied to wte,
and Conv1D projections: weight [in, out], so a unit's output channels are weight dim 1 and the bias follows them.

c_attn is one Conv1D whose 3 * hidden outputs are [q heads | k heads | v heads]: a head owns three `head_dim` blocks
of it, at offsets 0, H*d and 2*H*d (Part offsets, nothing fused is special-cased). GPT2Attention splits c_attn by
`split_size` and reshapes with -1 heads, so after a head cut `set_layer_attrs` sets split_size = heads * head_dim.

GPT2Config has no head_dim: GPT2Attention derives it as n_embd / n_head. So a cut is a standard checkpoint only when
hidden == heads * head_dim (e.g. 12 heads of 64 -> 9 heads and hidden 576), like BERT; other head or hidden cuts keep
the original config plus `"lopper_layout": "plan"` and load with `lopper.load()`. Depth and MLP width always give
standard checkpoints (n_inner is written when it is no longer 4 * n_embd).

`scale_attn_by_inverse_layer_idx` divides scores by (layer_idx + 1), which renumbering would change; the ratio is
folded into the q weights so that dropped layers stay exact. Hidden pruning is not exactly mask-equivalent
(LayerNorm's mean and variance run over the kept channels). Cross-attention GPT-2 (add_cross_attention) is refused.
"""
import torch
from torch import nn

from ..errors import LopperError
from .base import Adapter, Part


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    has_kv_groups = False
    rms_norm = False
    derived_head_dim = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(self.config, "add_cross_attention", False):
            raise LopperError("GPT-2 with cross-attention (add_cross_attention=True) is not supported: prune the "
                              "decoder-only model")

    def layers(self) -> nn.ModuleList:
        return self.backbone().h

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.backbone().h = nn.ModuleList(layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def head_dim(self) -> int:
        return self.attention(self.layers()[0]).head_dim  # fixed at load; the config only has n_embd / n_head

    def embeddings(self) -> list[nn.Embedding]:
        return [self.backbone().wte, self.backbone().wpe]

    def final_norms(self) -> list[nn.Module]:
        return [self.backbone().ln_f]

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.ln_1, layer.ln_2]

    def mlp_in(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.mlp.c_fc]

    def mlp_out(self, layer: nn.Module) -> nn.Module:
        return layer.mlp.c_proj

    def _heads(self, layer: nn.Module) -> int:
        return self.attention(layer).c_attn.weight.shape[1] // (3 * self.head_dim())

    def head_parts(self, layer: nn.Module) -> list[Part]:
        a, d, h = self.attention(layer), self.head_dim(), self._heads(layer)
        return [Part(a.c_attn, 1, offset=i * h * d, block=d) for i in range(3)] + [Part(a.c_proj, 0, block=d)]

    def kv_parts(self, layer: nn.Module) -> list[Part]:
        return []

    def mlp_parts(self, layer: nn.Module) -> list[Part]:
        return [Part(layer.mlp.c_fc, 1), Part(layer.mlp.c_proj, 0)]

    def readers(self, layer: nn.Module) -> list[nn.Module]:
        return [self.attention(layer).c_attn, layer.mlp.c_fc]

    def writers(self, layer: nn.Module) -> list[nn.Module]:
        return [self.attention(layer).c_proj, layer.mlp.c_proj]

    def hidden_parts(self) -> list[Part]:
        parts = super().hidden_parts()
        score = getattr(self.model, "score", None)  # GPT2ForSequenceClassification
        if isinstance(score, nn.Linear):
            parts.append(Part(score, 1))
        return parts

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        return {"heads": self._heads(layer), "mlp": layer.mlp.c_proj.weight.shape[0]}

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        a = self.attention(layer)
        a.num_heads = self._heads(layer)
        a.split_size = a.num_heads * self.head_dim()
        if a.scale_attn_by_inverse_layer_idx and a.layer_idx != index:
            # scores were divided by (old index + 1); a reloaded model divides by (index + 1): move the difference
            # into the q block of c_attn (columns 0 .. split_size-1 and their bias)
            f = (index + 1) / (a.layer_idx + 1)
            with torch.no_grad():
                a.c_attn.weight[:, :a.split_size].mul_(f)
                a.c_attn.bias[:a.split_size].mul_(f)
            a.scaling /= f  # what GPT2Attention computes for layer `index`
        a.layer_idx = index

    def config_updates(self, widths: dict[str, int], kept_layers: list[int], hidden_before: int) -> dict:
        c = self.config
        inner = None if c.n_inner is None and widths["mlp"] == 4 * widths["hidden"] else widths["mlp"]
        return {"n_layer": len(kept_layers), "n_head": widths["heads"], "n_embd": widths["hidden"], "n_inner": inner}
