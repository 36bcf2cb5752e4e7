"""OPT (`opt`): biases on every projection (enable_bias), a plain fc1/fc2 MLP, learned positions (an Embedding with
2 extra rows: OPT's position offset, untouched by any cut), LayerNorms, pre-norm or post-norm (do_layer_norm_before;
OPT-350m is post-norm and has no final LayerNorm), and lm_head tied to embed_tokens.

When word_embed_proj_dim != hidden_size (OPT-350m: 512 vs 1024) the token embeddings and lm_head live in the smaller
space and project_in / project_out map to and from the residual stream. Hidden pruning then cuts the stream only:
project_in's output rows, project_out's input columns and the position embeddings; embed_tokens and lm_head keep
their width. The config stays standard unless the new hidden_size happens to equal word_embed_proj_dim (OPTDecoder
would then build no projections; `check_config` says so).

OPTAttention derives head_dim = hidden_size / num_attention_heads (as GPT-2 and BERT do), so head or hidden cuts that
break hidden == heads * head_dim are saved as a lopper layout and load with `lopper.load()`. Hidden pruning is not
exactly mask-equivalent (LayerNorm statistics run over the kept channels). LayerNorms without weights
(layer_norm_elementwise_affine=False) have nothing to slice: `set_layer_attrs` resizes them.
"""
from torch import nn

from .base import Adapter, Part


class OPTAdapter(Adapter):
    model_types = ("opt",)
    has_kv_groups = False
    rms_norm = False
    derived_head_dim = True

    def decoder(self) -> nn.Module:
        return self.backbone().decoder

    def writes_residual(self) -> bool:
        return self.config.do_layer_norm_before  # post-norm OPT (350m) normalises the sum instead

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.decoder().layers = nn.ModuleList(layers)

    def head_dim(self) -> int:
        return self.attention(self.layers()[0]).head_dim

    def embeddings(self) -> list[nn.Embedding]:
        return [self.decoder().embed_tokens, self.decoder().embed_positions]

    def hidden_size(self) -> int:
        return self.decoder().embed_positions.weight.shape[1]  # the stream; embed_tokens may be narrower

    @staticmethod
    def _affine(norms: list) -> list[nn.Module]:
        return [n for n in norms if n is not None and n.weight is not None]

    def final_norms(self) -> list[nn.Module]:
        return self._affine([self.decoder().final_layer_norm])

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return self._affine([layer.self_attn_layer_norm, layer.final_layer_norm])

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.fc1]

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return layer.fc2

    def head_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        return [Part(a.q_proj, 0, block=d), Part(a.k_proj, 0, block=d), Part(a.v_proj, 0, block=d),
                Part(a.out_proj, 1, block=d)]

    def kv_parts(self, layer: nn.Module) -> list[Part]:
        return []

    def writers(self, layer: nn.Module) -> list[nn.Linear]:
        return [self.attention(layer).out_proj, layer.fc2]

    def hidden_parts(self) -> list[Part]:
        dec = self.decoder()
        if dec.project_in is None:
            parts = super().hidden_parts()
        else:  # token embeddings and lm_head stay in word_embed_proj_dim; the stream starts at project_in
            parts = [Part(dec.embed_positions, 1), Part(dec.project_in, 0), Part(dec.project_out, 1)]
            for layer in self.layers():
                parts += [Part(m, 1) for m in self.readers(layer)] + [Part(m, 0) for m in self.writers(layer)]
                parts += [Part(n, 0) for n in self.layer_norms(layer)]
            parts += [Part(n, 0) for n in self.final_norms()]
        score = getattr(self.model, "score", None)  # OPTForSequenceClassification reads word_embed_proj_dim
        if dec.project_in is None and isinstance(score, nn.Linear):
            parts.append(Part(score, 1))
        return parts

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        return {"heads": self.attention(layer).q_proj.weight.shape[0] // self.head_dim(),
                "mlp": layer.fc2.weight.shape[1]}

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        a = self.attention(layer)
        a.num_heads = self.layer_widths(layer)["heads"]
        a.layer_idx = index
        hidden = self.hidden_size()
        for norm in (layer.self_attn_layer_norm, layer.final_layer_norm, self.decoder().final_layer_norm):
            if norm is not None and norm.weight is None:
                norm.normalized_shape = (hidden,)

    def config_updates(self, widths: dict[str, int], kept_layers: list[int], hidden_before: int) -> dict:
        upd = {"num_hidden_layers": len(kept_layers), "num_attention_heads": widths["heads"],
               "ffn_dim": widths["mlp"], "hidden_size": widths["hidden"]}
        if self.decoder().project_in is None:
            upd["word_embed_proj_dim"] = widths["hidden"]
        return upd

    def check_config(self, updates: dict) -> str | None:
        problem = super().check_config(updates)
        if problem is None and self.decoder().project_in is not None and \
                updates.get("hidden_size") == self.config.word_embed_proj_dim:
            problem = (f"hidden_size {updates['hidden_size']} equals word_embed_proj_dim, and OPTDecoder then builds "
                       "no project_in/project_out")
        return problem
