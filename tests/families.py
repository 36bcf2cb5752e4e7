"""The family registry of the tests: one row per architecture family lopper supports, saying how to build a tiny
random model of it, which random architectures and plans hypothesis may draw, and the traits the shared property
tests read (tests/test_families.py). Adding a family is one adapter file (src/lopper/arch/) and one row here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st

from plans import draw_heads, draw_plan, kept
from lopper.plan import Plan, identity_plan
from tiny import make_model, tiny_model, tiny_moe

CORE = ("layers", "heads", "kv", "mlp", "hidden", "all")
INIT = 0.2  # large random weights: any wrongly kept or dropped unit moves the outputs by O(1), not O(1e-2)


@dataclass(frozen=True)
class Family:
    name: str
    archs: Callable          # hypothesis strategy (family, kind, tied) -> arch dict
    build: Callable          # arch dict -> model (eval mode, random weights)
    kinds: tuple[str, ...]   # the structures whose cut equals the masked model exactly
    tie_options: tuple[bool, ...] = (False, True)  # tied input/output embeddings drawn per test case
    layernorm: bool = False  # hidden cuts are not mask-equivalent (LayerNorm statistics): run, save, reload only
    gqa: bool = True         # grouped-query attention (KV groups are a structure)
    moe: bool = False
    encoder: bool = False
    derived_head_dim: bool = False  # the config has no head_dim (hidden / heads): cuts breaking it are not standard

    def plan(self, data, adapter, kind: str) -> Plan:
        if self.moe:
            return draw_moe_plan(data, adapter, kind)
        return draw_plan(data, adapter, kind, hidden=not (self.layernorm or self.encoder))

    def inputs(self, seed: int) -> torch.Tensor:
        return torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(seed))


# ---- random tiny architectures -----------------------------------------------------------------------------------
@st.composite
def core_archs(draw, family: str, kind: str, tied: bool) -> dict:
    """Llama, Mistral, Qwen2, Qwen3 and BERT (tiny.tiny_model), on which a plan of `kind` removes something."""
    kv = draw(st.integers(2 if kind == "kv" else 1, 3))
    group = draw(st.integers(2 if kind == "heads" else 1, 3))
    arch = dict(family=family, seed=draw(st.integers(0, 2**16)), layers=draw(st.integers(2, 4)), heads=kv * group,
                kv_heads=kv, head_dim=draw(st.sampled_from([4, 8])), mlp=draw(st.integers(8, 40)), tied=tied)
    if family in ("bert", "roberta"):
        del arch["kv_heads"], arch["tied"]
    return arch


TYPES = ("sliding_attention", "full_attention")


@st.composite
def ext_archs(draw, family: str, kind: str, tied: bool) -> dict:
    """GPT-2, OPT, Phi-3, Gemma 2 / 3 (tiny.make_model), with their options drawn too."""
    gqa = family in ("phi3", "gemma2", "gemma3_text")
    kv = draw(st.integers(2 if kind == "kv" else 1, 3)) if gqa else 1
    group = draw(st.integers(2 if kind == "heads" or not gqa else 1, 4 if not gqa else 3))
    head_dim = draw(st.sampled_from([4, 8]))
    head_dim = 8 if kv * group * head_dim < 16 else 4 if kv * group * head_dim > 48 else head_dim  # hidden 16..48
    arch = dict(family=family, seed=draw(st.integers(0, 2**16)), layers=draw(st.integers(2, 4)), heads=kv * group,
                kv_heads=kv, head_dim=head_dim, mlp=draw(st.integers(8, 40)))
    if family != "gpt2":
        arch["tied"] = tied
    if family == "gpt2":
        arch["scale_attn_by_inverse_layer_idx"] = draw(st.booleans())
    elif family == "opt":
        arch["do_layer_norm_before"] = draw(st.booleans())
        arch["enable_bias"] = draw(st.booleans())
        if draw(st.booleans()):
            arch["word_embed_proj_dim"] = 12  # project_in / project_out around the stream
    elif family.startswith("gemma"):
        heads = arch["heads"]
        arch["hidden"] = heads * draw(st.integers(max(2, -(-16 // heads)), 32 // heads))  # config: hidden % heads
        arch["layer_types"] = [draw(st.sampled_from(TYPES)) for _ in range(arch["layers"])]
        arch["sliding_window"] = draw(st.integers(2, 5))
        if family == "gemma3_text":
            arch["final_logit_softcapping"] = draw(st.sampled_from([None, 5.0]))
    return arch


@st.composite
def moe_archs(draw, family: str, kind: str, tied: bool) -> dict:
    """Mixtral, Qwen2-MoE, Qwen3-MoE (tiny.tiny_moe): experts, top-k, dense layers, a shared expert."""
    experts = draw(st.integers(2, 5))
    layers = draw(st.integers(2, 4))
    arch = dict(family=family, seed=draw(st.integers(0, 2**16)), layers=layers, experts=experts,
                top_k=draw(st.integers(1, min(2, experts - 1))), per=draw(st.integers(2, 12)),
                kv_heads=draw(st.integers(1, 2)), tied=tied)
    arch["heads"] = arch["kv_heads"] * draw(st.integers(2 if kind == "heads" else 1, 3))
    arch["head_dim"] = 8 if arch["heads"] < 3 else 4
    if family != "mixtral":
        arch["dense"] = draw(st.lists(st.integers(0, layers - 1), max_size=1, unique=True))
        arch["norm_topk"] = draw(st.booleans())
    if family == "qwen2_moe":
        arch["shared"] = draw(st.integers(2, 12))
    return arch


def draw_moe_plan(data, adapter, kind: str) -> Plan:
    """A random valid plan that removes something of `kind` (every structure for 'all') that the outputs show: the
    first kept layer always loses some of it. 'mlp' is what `--mlp F` cuts: dense MLP layers, the shared expert and
    the channels inside every kept expert (so Mixtral, which has no dense MLP, is cut too). Whole experts ('experts')
    are the one cut the outputs may not show: no token may have been routed to the expert removed."""
    plan = identity_plan(adapter)
    sig = plan.model
    if kind in ("layers", "all"):
        plan.layers = kept(data, sig["num_layers"], "layers", strict=True)
    for n, i in enumerate(plan.layers):
        entry, must = plan.per_layer[i], n == 0
        if kind in ("heads", "all"):
            draw_heads(data, plan, i, "any", "strict" if must and sig["heads"][i] > sig["kv_heads"][i] else "any")
        if sig["experts"][i] and kind in ("experts", "expert_mlp", "mlp", "all"):
            e, per = sig["experts"][i], sig["expert_mlp"][i] // sig["experts"][i]
            top_k = adapter.config.num_experts_per_tok
            entry["experts"] = kept(data, e, f"layer {i} experts", strict=kind == "experts", least=top_k) \
                if kind in ("experts", "all") else list(range(e))
            inside = kind in ("expert_mlp", "mlp") or (kind == "all" and must)
            count = data.draw(st.integers(1, per - 1 if inside else per), label=f"layer {i} per expert")
            entry["expert_mlp"] = sorted(x * per + j for x in entry["experts"]
                                         for j in data.draw(st.permutations(range(per)))[:count])
        for key in ("mlp", "shared_mlp"):
            if sig.get(key, [0] * (i + 1))[i] and kind in ("mlp", "all"):
                entry[key] = kept(data, sig[key][i], f"layer {i} {key}", strict=must)
    if kind in ("hidden", "all"):
        plan.hidden = kept(data, sig["hidden"], "hidden", strict=True, least=max(1, sig["hidden"] // 2))
    return plan


def _core(arch):
    return tiny_model(init=INIT, attn="eager", **arch)


def _ext(arch):
    return make_model(**arch)


def _moe(arch):
    return tiny_moe(**arch)


MOE_KINDS = ("layers", "heads", "experts", "expert_mlp", "mlp", "hidden", "all")
REGISTRY: dict[str, Family] = {f.name: f for f in [
    Family("llama", core_archs, _core, CORE),
    Family("mistral", core_archs, _core, CORE),
    Family("qwen2", core_archs, _core, CORE),
    Family("qwen3", core_archs, _core, CORE),
    Family("bert", core_archs, _core, ("layers", "heads", "mlp", "all"), tie_options=(False,), gqa=False,
           encoder=True, layernorm=True, derived_head_dim=True),
    Family("roberta", core_archs, _core, ("layers", "heads", "mlp", "all"), tie_options=(False,), gqa=False,
           encoder=True, layernorm=True, derived_head_dim=True),
    Family("gpt2", ext_archs, _ext, ("layers", "heads", "mlp", "all"), tie_options=(True,), layernorm=True,
           gqa=False, derived_head_dim=True),
    Family("opt", ext_archs, _ext, ("layers", "heads", "mlp", "all"), layernorm=True, gqa=False, derived_head_dim=True),
    Family("phi3", ext_archs, _ext, CORE),
    Family("gemma2", ext_archs, _ext, CORE),
    Family("gemma3_text", ext_archs, _ext, CORE),
    Family("mixtral", moe_archs, _moe, MOE_KINDS, moe=True),
    Family("qwen2_moe", moe_archs, _moe, MOE_KINDS, moe=True, derived_head_dim=True),
    Family("qwen3_moe", moe_archs, _moe, MOE_KINDS, moe=True),
]}
