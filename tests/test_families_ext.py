"""The families added for breadth: GPT-2 (Conv1D, fused c_attn, learned positions), OPT (biases, fc1/fc2, position
offset, project_in/out, post-norm), Phi-3 (fused qkv_proj and gate_up_proj), Gemma 2 / Gemma 3 text (sandwich norms,
(1 + w) RMSNorm, scaled embeddings, soft-capping, sliding-window layer_types).

The registry's properties run for these families in test_families.py (pruned == masked, identity, which uniform
cuts are standard, save and reload, generation after dropped layers). Here: LayerNorm families (GPT-2, OPT), not
mask-equivalent under hidden cuts, must run, save and reload; and each family's own details.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import lopper
from lopper import io, surgery
from lopper.arch import adapter_for
from lopper.arch.base import ConfigView
from lopper.errors import LopperError
from lopper.importance import collect, width_scores
from lopper.plan import Plan, identity_plan
from lopper.select import Target, choose
from plans import draw_plan, uniform_plan
from checks import check_shapes, rebuild_from_config
from families import REGISTRY
from tiny import make_config, make_model

LAYERNORM = ("gpt2", "opt")  # hidden cuts are not mask-equivalent (LayerNorm statistics)
TOL = 1e-4
VOCAB = 96
SEQ = 9


def forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def inputs(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def model_of(arch: dict):
    return make_model(**arch)


def archs(family: str, kind: str = "all"):
    return REGISTRY[family].archs(family, kind, False)


# ---- LayerNorm families: hidden cuts run, save and reload ----------------------------------------------------------
@pytest.mark.parametrize("family", LAYERNORM)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_layernorm_hidden_cut_runs_saves_reloads(family, data, tmp_path_factory):
    arch = data.draw(archs(family), label="arch")
    model = model_of(arch)
    ids = inputs(arch["seed"])
    plan = draw_plan(data, adapter_for(model), "all", hidden=True)
    surgery.apply(model, adapter_for(model), plan)
    got = forward(model, ids)
    assert torch.isfinite(got).all() and got.shape == (2, SEQ, VOCAB)
    check_shapes(model, plan, arch.get("tied", family == "gpt2"))
    reloaded = save_and_reload(model, plan, tmp_path_factory.mktemp(family))
    assert (forward(reloaded, ids) - got).abs().max().item() < TOL


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_standard_cut_keeps_the_kept_layers_types(family):
    """Which uniform cuts are standard, and generation after dropped layers, are registry tests (test_families.py);
    here the sliding / full pattern of a standard Gemma checkpoint follows its kept layers."""
    model = make_model(family, seed=1, tied=True)
    plan = uniform_plan(adapter_for(model), {"layers": [0, 2]})
    assert surgery.apply(model, adapter_for(model), plan)
    assert model.config.layer_types == [make_config(family).layer_types[i] for i in plan.layers]


def save_and_reload(model, plan: Plan, folder):
    out = io.save(model, folder / "out", source=str(folder / "nowhere"), tokenizer=None, plan=plan, report={},
                  dtype=None)
    config = json.loads((out / "config.json").read_text())
    if config.get("lopper_layout") == "plan":
        return lopper.load(str(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    return reloaded.eval()


def test_activation_scores_see_conv1d_inputs():
    model = make_model("gpt2", seed=5)
    adapter = adapter_for(model)
    stats = collect(model, adapter, [inputs(5)[:1]], quiet=True)
    c_attn = adapter.attention(adapter.layers()[0]).c_attn
    assert stats.input_sq[id(c_attn)].shape == (c_attn.nx,)
    scores = width_scores(adapter, stats, "activation")
    for s in (*scores.heads.values(), *scores.mlp.values(), scores.hidden):
        assert torch.isfinite(s).all() and (s > 0).all()


# ---- family details ------------------------------------------------------------------------------------------------
def test_gpt2_head_and_hidden_combinations():
    adapter = adapter_for(make_model("gpt2"))
    assert adapter.check_config({"n_layer": 3, "n_head": 3, "n_embd": 24, "n_inner": 24}) is None
    problem = adapter.check_config({"n_layer": 3, "n_head": 3, "n_embd": 32, "n_inner": 24})
    assert "3 heads of 8 need hidden_size 24" in problem
    # the planner keeps such cuts as a lopper layout instead of refusing them (as for BERT)
    plan = choose(adapter, Target(heads=0.25, round_to=1), None, width_scores(adapter, None, "magnitude"))
    assert all(len(e["heads"]) == 3 for e in plan.per_layer.values()) and len(plan.hidden) == 32


def test_gpt2_inverse_layer_idx_scaling_follows_renumbering(tmp_path):
    model = make_model("gpt2", seed=6, layers=4, scale_attn_by_inverse_layer_idx=True)
    ids = inputs(6)
    plan = identity_plan(adapter_for(model))
    plan.layers = [0, 3]  # layer 3 becomes layer 1: its scores were divided by 4, a fresh GPT-2 divides by 2
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    assert surgery.apply(model, adapter_for(model), plan)
    got = forward(model, ids)
    assert (got - forward(masked, ids)).abs().max().item() < TOL
    assert (forward(save_and_reload(model, plan, tmp_path), ids) - got).abs().max().item() < TOL


def test_opt_projections_hidden_cut():
    model = make_model("opt", seed=7, word_embed_proj_dim=12)
    adapter = adapter_for(model)
    assert adapter.hidden_size() == 32
    plan = identity_plan(adapter)
    plan.hidden = list(range(0, 32, 2))  # 16 = 2 heads of 8 ...
    for entry in plan.per_layer.values():
        entry["heads"] = [1, 2]
    assert surgery.apply(model, adapter, plan)
    dec = model.model.decoder
    assert dec.embed_tokens.weight.shape == (VOCAB, 12) and model.lm_head.weight.shape == (VOCAB, 12)
    assert dec.project_in.weight.shape == (16, 12) and dec.project_out.weight.shape == (12, 16)
    assert model.config.word_embed_proj_dim == 12 and model.config.hidden_size == 16
    assert torch.isfinite(forward(rebuild_from_config(model), inputs(7))).all()
    # ... but a stream as wide as word_embed_proj_dim would make OPTDecoder drop the projections
    other = make_model("opt", seed=7, word_embed_proj_dim=12, heads=4, head_dim=4)  # 3 heads of 4 fit hidden 12
    problem = adapter_for(other).check_config({"num_hidden_layers": 3, "num_attention_heads": 3, "ffn_dim": 24,
                                               "hidden_size": 12})
    assert problem and "word_embed_proj_dim" in problem


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("tied", [False, True])
def test_gemma_embedding_scale_and_norms_after_hidden_cut(family, tied):
    model = make_model(family, seed=8, tied=tied)
    ids = inputs(8)
    plan = identity_plan(adapter_for(model))
    plan.hidden = list(range(8, 32))
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    assert surgery.apply(model, adapter_for(model), plan)
    embed = model.model.embed_tokens
    assert math.isclose(embed.embed_scale.item(), math.sqrt(24), rel_tol=1e-6)  # what a fresh model computes
    got = forward(model, ids)
    assert (got - forward(masked, ids)).abs().max().item() < TOL
    fresh = rebuild_from_config(model)
    assert math.isclose(fresh.model.embed_tokens.embed_scale.item(), math.sqrt(24), rel_tol=1e-6)
    assert (forward(fresh, ids) - got).abs().max().item() < 1e-5


def test_lopper_layout_views_follow_the_kept_layers():
    """Per-layer widths keep the original config: Phi-3's attention gets its own head count, Gemma's backbone the
    kept layers' types; a standard cut leaves neither behind."""
    phi = make_model("phi3", seed=9)
    plan = identity_plan(adapter_for(phi))
    plan.per_layer[0]["heads"], plan.per_layer[0]["kv_heads"] = [0, 1], [0]
    assert not surgery.apply(phi, adapter_for(phi), plan)
    assert isinstance(phi.model.layers[0].self_attn.config, ConfigView)
    assert phi.model.layers[0].self_attn.config.num_attention_heads == 2
    assert phi.model.layers[1].self_attn.config is phi.config

    gemma = make_model("gemma2", seed=9, layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    plan = identity_plan(adapter_for(gemma))
    plan.layers = [1, 2]
    plan.per_layer[1]["mlp"] = list(range(10))
    assert not surgery.apply(gemma, adapter_for(gemma), plan)
    for config in (gemma.config, gemma.model.config):  # what forward() and generate()'s cache read
        assert config.layer_types == ["sliding_attention", "sliding_attention"] and config.num_hidden_layers == 2
    saved = gemma.config.to_dict()  # what save_pretrained writes: the original depth, for lopper.load's replay
    assert saved["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert saved["num_hidden_layers"] == 3 and saved["lopper_layout"] == "plan"
    assert adapter_for(gemma).config is gemma.config.__dict__["_base"]
    copy.deepcopy(gemma)  # views survive copying

    std = make_model("gemma2", seed=9, layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    plan.per_layer[1]["mlp"] = plan.per_layer[2]["mlp"]
    assert surgery.apply(std, adapter_for(std), plan)
    assert std.model.config is std.config and std.config.layer_types == ["sliding_attention", "sliding_attention"]


def test_gpt2_cross_attention_is_refused():
    model = make_model("gpt2", add_cross_attention=True)
    with pytest.raises(LopperError, match="cross-attention"):
        adapter_for(model)
