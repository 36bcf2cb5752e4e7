"""The adapter interface: where the prunable structures of one architecture family live.

Every structure is described as a list of `Part`s: slices of weight tensors that belong to one unit (a query head,
a KV group, an MLP channel, a hidden channel). Scoring, masking and surgery all read the same Parts, so a family with
fused projections (one `qkv_proj`) or experts only has to say where its units sit; the cutting code is shared.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def out_dim(module: nn.Module) -> int:
    """The weight dimension of a module's output channels (its bias follows it): 0 for Linear (weight [out, in]) and
    for norms, 1 for the Conv1D of GPT-2 (weight [in, out])."""
    return 1 if isinstance(module, Conv1D) else 0


def in_dim(module: nn.Module) -> int:
    """The weight dimension of a Linear's or Conv1D's input channels."""
    return 1 - out_dim(module)


class ConfigView:
    """A config seen with a few values overridden, in memory only (never saved): for a forward() that reads a width
    or the layer pattern from the shared config when a lopper layout keeps the config's original values (Phi-3's
    attention reads num_attention_heads; decoders pick each layer's mask by config.layer_types[i]). Reads of other
    names and all writes go to the real config."""

    def __init__(self, base, **overrides):
        while isinstance(base, ConfigView):
            base = base.__dict__["_base"]
        self.__dict__.update(_base=base, **overrides)

    def __getattr__(self, name):
        base = self.__dict__.get("_base")
        if base is None:  # mid-copy (deepcopy builds an empty instance first)
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def get_text_config(self, *args, **kwargs):
        return self  # caches and masks ask for the text config: it is this one, overrides included


@torch.no_grad()
def match_qk_norm_eps(attn: nn.Module, eps: float, eps_attr: str) -> None:
    """Per-head q/k RMSNorms (Qwen3, Gemma 3) read the config's rms_norm_eps, which hidden pruning scales by r:
    RMSNorm(sqrt(r) q) with eps * r equals RMSNorm(q) with eps, so scale q_proj/k_proj by sqrt(r) and give the
    norms the scaled eps, exactly what a reload from the saved config builds."""
    for norm, proj in ((attn.q_norm, attn.q_proj), (attn.k_norm, attn.k_proj)):
        ratio = eps / getattr(norm, eps_attr)
        if ratio != 1.0:
            proj.weight.mul_(math.sqrt(ratio))
            if proj.bias is not None:
                proj.bias.mul_(math.sqrt(ratio))
            setattr(norm, eps_attr, eps)


class ExpertTensor:
    """One 3-D parameter of a mixture-of-experts layer ([experts, ...], e.g. gate_up_proj [E, 2I, H] and down_proj
    [E, H, I] in transformers 5) seen as a module with a `.weight`, so that Parts, cuts and masks address it like
    any Linear. Dim 0 indexes experts; along `flat_dim` (the expert's own channels) indices are flat,
    e * shape[flat_dim] + channel, because each expert keeps its own channels; other dims are plain (hidden)."""

    def __init__(self, module: nn.Module, name: str, flat_dim: int):
        self.module, self.name, self.flat_dim = module, name, flat_dim

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @weight.setter
    def weight(self, value: nn.Parameter) -> None:
        setattr(self.module, self.name, value)

    @classmethod
    def of(cls, module: nn.Module, name: str, flat_dim: int) -> ExpertTensor:
        """The one view of (module, name): cuts are keyed by (view, dim), so the same view must come back."""
        views = _EXPERT_VIEWS.setdefault(module, {})
        if name not in views:
            views[name] = cls(module, name, flat_dim)
        return views[name]


_EXPERT_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Part:
    """Unit u of a structure owns channels `offset + u*block ... offset + (u+1)*block - 1` of `module.weight` along
    `dim` (0 = output rows of a Linear, 1 = input columns; dim 1 of an Embedding; dim 0 of a norm; a Conv1D is
    the other way round: `out_dim` / `in_dim` say which). Masking and cutting also take the bias entries of channels
    along `out_dim(module)`. Experts' own channels (`per_expert` = channels per expert, on an ExpertTensor's flat
    dim): unit u is channel u % per_expert of expert u // per_expert."""

    module: nn.Module
    dim: int
    offset: int = 0
    block: int = 1
    per_expert: int = 0

    def channels(self, units: list[int]) -> torch.Tensor:
        u = torch.as_tensor(units, dtype=torch.long)
        if self.per_expert:
            e, u = u // self.per_expert, u % self.per_expert
            local = (self.offset + u[:, None] * self.block + torch.arange(self.block)).flatten()
            return e.repeat_interleave(self.block) * self.module.weight.shape[self.dim] + local
        return (self.offset + u[:, None] * self.block + torch.arange(self.block)).flatten()

    def per_unit(self, t: torch.Tensor, n_units: int) -> torch.Tensor:
        """Sum a tensor shaped like the weight (|W|, |W * grad|) over each of the first n_units units: [n_units]."""
        if t.dim() == 1:
            per_channel = t
        elif isinstance(self.module, ExpertTensor) and self.dim == self.module.flat_dim:
            per_channel = t.movedim(self.dim, 1).flatten(2).sum(2).flatten()  # [E * channels], flat indices
        else:
            per_channel = t.movedim(self.dim, 0).flatten(1).sum(1)
        idx = self.channels(list(range(n_units))).to(per_channel.device)
        return per_channel[idx].view(n_units, -1).sum(1)


class Adapter:
    """Base adapter for pre-norm decoders with separate q/k/v/o and a gated MLP (Llama layout).

    Subclasses name their modules; architectures that differ in layout override the `*_parts` methods.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    is_encoder: ClassVar[bool] = False
    has_kv_groups: ClassVar[bool] = True
    rms_norm: ClassVar[bool] = True  # hidden pruning rescales RMSNorm weights so masked == pruned
    # The config derives head_dim = hidden_size / num_attention_heads (GPT-2, OPT): head or hidden cuts that break
    # that are saved as a lopper layout (as for BERT) instead of being refused by the planner.
    derived_head_dim: ClassVar[bool] = False
    # kept hidden and MLP widths are multiples of this whatever --round-to says (kernels that need aligned strides)
    width_multiple: ClassVar[int] = 1
    # config.json field names transformers 4.x reads -> the name transformers 5 writes (io writes both)
    legacy_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config.__dict__.get("_base", model.config)  # the real config under a ConfigView

    # ---- where things live -------------------------------------------------------------------------------
    def backbone(self) -> nn.Module:
        return self.model.base_model

    def layers(self) -> nn.ModuleList:
        return self.backbone().layers

    def set_layers(self, layers: list[nn.Module]) -> None:
        self.backbone().layers = nn.ModuleList(layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def embeddings(self) -> list[nn.Embedding]:
        return [self.backbone().embed_tokens]

    def lm_head(self) -> nn.Linear | None:
        return getattr(self.model, "lm_head", None)

    def final_norms(self) -> list[nn.Module]:
        return [self.backbone().norm]

    def layer_norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm, layer.post_attention_layernorm]

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    # ---- parts per structure ------------------------------------------------------------------------------
    def head_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        return [Part(a.q_proj, 0, block=d), Part(a.o_proj, 1, block=d)]

    def kv_parts(self, layer: nn.Module) -> list[Part]:
        a, d = self.attention(layer), self.head_dim()
        return [Part(a.k_proj, 0, block=d), Part(a.v_proj, 0, block=d)]

    def mlp_parts(self, layer: nn.Module) -> list[Part]:
        return [Part(m, 0) for m in self.mlp_in(layer)] + [Part(self.mlp_out(layer), 1)]

    def readers(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that read the (normed) residual stream: hidden channels are their input columns."""
        a = self.attention(layer)
        return [a.q_proj, a.k_proj, a.v_proj, *self.mlp_in(layer)]

    def writers(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears that write into the residual stream: hidden channels are their output rows."""
        return [self.attention(layer).o_proj, self.mlp_out(layer)]

    def writes_residual(self) -> bool:
        """Whether the attention's writer and mlp_out add their outputs unchanged into the residual stream, the
        attention's first (pre-norm decoders): repair can then aim them at the unpruned model's stream."""
        return not self.is_encoder

    def hidden_parts(self) -> list[Part]:
        parts = [Part(e, 1) for e in self.embeddings()]
        for layer in self.layers():
            parts += [Part(m, in_dim(m)) for m in self.readers(layer)]
            parts += [Part(m, out_dim(m)) for m in self.writers(layer)]
            parts += [Part(n, 0) for n in self.layer_norms(layer)]
        parts += [Part(n, 0) for n in self.final_norms()]
        if self.lm_head() is not None:
            parts.append(Part(self.lm_head(), 1))
        return parts

    def extra_parts(self, layer: nn.Module) -> dict[str, list[Part]]:
        """Structures beyond heads, KV groups and MLP channels, by the name they have in `layer_widths` and plans
        (mixture-of-experts: 'experts', 'expert_mlp', 'shared_mlp'). A layer without one has width 0 and no Parts."""
        return {}

    def mask_hooks(self, layer: nn.Module, removed: dict[str, list[int]]) -> list:
        """Forward hooks that make a masked layer compute what the cut one computes where zeroing weights cannot (a
        router must never pick a removed expert). `removed`: structure -> removed units. Returns the handles."""
        return []

    def calibration_hooks(self, store: dict) -> list:
        """Hooks that add family-specific sums to `store` while importance.collect runs the calibration text."""
        return []

    def custom_scores(self, index: int, layer: nn.Module, key: str, store: dict, metric: str):
        """Scores [units] for structure `key` of layer `index` where Parts alone cannot give them, else None."""
        return None

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors as save_pretrained wrote them -> this model's state_dict names (for lopper.load)."""
        return state

    # ---- sizes --------------------------------------------------------------------------------------------
    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        """Current widths of one layer, read off the weights (so it is right after surgery too)."""
        d = self.head_dim()
        a = self.attention(layer)
        widths = {"heads": self.head_parts(layer)[0].module.weight.shape[0] // d,
                  "mlp": self.mlp_out(layer).weight.shape[1]}
        if self.has_kv_groups:
            widths["kv_heads"] = a.k_proj.weight.shape[0] // d
        return widths

    def hidden_size(self) -> int:
        return self.embeddings()[0].weight.shape[1]

    def embedding_params(self) -> list[nn.Parameter]:
        params = [e.weight for e in self.embeddings()]
        if self.lm_head() is not None:
            params.append(self.lm_head().weight)
        return params

    # ---- during and after surgery -------------------------------------------------------------------------
    def scale_norm(self, norm: nn.Module, s: float) -> None:
        """Multiply what an RMSNorm's weight contributes by s (hidden pruning's sqrt(d/d')): the norm computes
        x_hat * weight here; Gemma's computes x_hat * (1 + weight) and overrides this."""
        norm.weight.mul_(s)

    def after_hidden_cut(self, ratio: float) -> None:
        """Called once after hidden channels were cut (and RMSNorms rescaled), ratio = d / d'. For values derived
        from hidden_size at load time (Gemma's embedding normalizer sqrt(hidden_size))."""

    def finish(self, standard: bool) -> None:
        """Called once after surgery and the config rewrite. In a lopper layout (standard=False) the config keeps the
        original widths and depth. Where dropped layers leave kept layers whose types (sliding / full attention) are
        not config.layer_types[:n], the backbone's forward() (mask and RoPE per config.layer_types[i]) and
        generate()'s KV cache (one slot type per config.layer_types entry) would pick the wrong ones: the model and
        its backbone then get a view of the config with the kept layers' own types (Qwen2, Gemma). The saved
        config is the real one, unchanged."""
        for m in (self.model, self.backbone()):
            if isinstance(m.config, ConfigView):  # from an earlier cut of this model
                m.config = self.config
        types = getattr(self.config, "layer_types", None)
        if standard or types is None:
            return
        kept = [getattr(self.attention(layer), "layer_type", None) for layer in self.layers()]
        if None not in kept and kept != list(types[:len(kept)]):
            view = ConfigView(self.config, layer_types=kept, num_hidden_layers=len(kept))
            self.model.config = self.backbone().config = view

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        """Fix module attributes that forward() reads, after the weights of `layer` were cut."""
        a, w = self.attention(layer), self.layer_widths(layer)
        a.layer_idx = index
        a.num_key_value_groups = w["heads"] // w["kv_heads"]

    def config_updates(self, widths: dict[str, int], kept_layers: list[int], hidden_before: int) -> dict:
        """New config values for uniform `widths` (heads, kv_heads, mlp, hidden) and the kept layer indices."""
        c = self.config
        upd = {"num_hidden_layers": len(kept_layers), "num_attention_heads": widths["heads"],
               "num_key_value_heads": widths["kv_heads"], "intermediate_size": widths["mlp"],
               "hidden_size": widths["hidden"], "head_dim": self.head_dim()}
        if widths["hidden"] != hidden_before:
            upd["rms_norm_eps"] = c.rms_norm_eps * hidden_before / widths["hidden"]
        if getattr(c, "layer_types", None) is not None:
            upd["layer_types"] = [c.layer_types[i] for i in kept_layers]
        if getattr(c, "max_window_layers", None) is not None and c.max_window_layers < c.num_hidden_layers:
            upd["max_window_layers"] = sum(1 for i in kept_layers if i < c.max_window_layers)
        if getattr(c, "head_dim", None) is None and upd["head_dim"] * widths["heads"] == widths["hidden"]:
            del upd["head_dim"]  # the config derives it from hidden / heads (Qwen2-MoE, Phi-3): keep it unwritten
        return upd

    def check_config(self, updates: dict) -> str | None:
        """None if the config class accepts these values, else its complaint. Keys may be a config class's aliases
        (hidden_size for GPT-2's n_embd)."""
        aliases = getattr(type(self.config), "attribute_map", {}) or {}
        updates = {aliases.get(k, k): v for k, v in updates.items()}
        d = self.config.to_dict()
        d.update(updates)
        try:
            type(self.config).from_dict(d)
        except Exception as e:  # config classes raise ValueError, TypeError or their own validation errors
            return " ".join(str(e).split()[-40:])
        if self.derived_head_dim:
            heads, hidden = updates.get(aliases.get("num_attention_heads", "num_attention_heads")), \
                updates.get(aliases.get("hidden_size", "hidden_size"))
            if heads is not None and hidden is not None and hidden != heads * self.head_dim():
                return (f"{type(self.config).__name__} derives the head size from hidden_size / num_attention_heads, "
                        f"so {heads} heads of {self.head_dim()} need hidden_size {heads * self.head_dim()}, not "
                        f"{hidden}")
        return None
