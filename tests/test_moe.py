"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): whole experts, channels inside experts, a shared
expert's channels, dense-MLP layers among MoE layers, plus the core structures.

The core's random-architecture properties run for these families in test_families.py. Here: each MoE structure
changes the outputs and matches the masked model (a masked expert is one the router can never pick), saved folders
reload (plain transformers for standard configs, lopper.load
for per-layer widths) with the same outputs, generation after layer removal matches the masked model, and
`lopper.prune --experts/--mlp` picks experts by routing-weighted output norms. Architectures and plans are drawn by
hypothesis.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import lopper
from lopper import io, surgery
from lopper.arch import adapter_for
from lopper.errors import LopperError
from lopper.importance import collect, width_scores
from lopper.plan import Plan, identity_plan, validate
from lopper.select import Target, choose
from checks import check_rebuilds_from_config, check_shapes, cut_and_compare
from tiny import MOE, tiny_moe

TOL = 1e-4
VOCAB = 96
KINDS = ("layers", "heads", "experts", "expert_mlp", "mlp", "hidden", "all")


def forward(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def inputs(seed: int, n: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def check_pruned_equals_masked(model, plan: Plan, ids, visible: bool = False) -> None:
    """Random plans may remove nothing visible (all experts and channels kept): `visible` only where one must."""
    standard, got = cut_and_compare(model, plan, ids, visible=visible)
    check_shapes(model, plan, tied=model.config.tie_word_embeddings)
    if standard:
        check_rebuilds_from_config(model, ids, got)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("kind", ["experts", "expert_mlp", "all"])
def test_each_structure_changes_outputs_and_matches(family, kind):
    """Fixed shapes where every drawn cut is visible: the masked model must differ from the original."""
    model = tiny_moe(family, seed=1, layers=3, experts=4, top_k=2, per=8, dense=(1,) if family != "mixtral" else ())
    adapter = adapter_for(model)
    plan = identity_plan(adapter)
    for i in plan.layers:
        entry = plan.per_layer[i]
        if plan.model["experts"][i] and kind in ("experts", "all"):
            entry["experts"] = [0, 2, 3]
        if plan.model["experts"][i]:
            width = 8 if kind == "experts" else 5
            entry["expert_mlp"] = [e * 8 + j for e in entry["experts"] for j in range(8 - width, 8)]
    if kind == "all":
        plan.layers = [0, 2]
        plan.hidden = [h for h in range(32) if h % 4]
    check_pruned_equals_masked(model, plan, inputs(1), visible=True)


def test_router_keeps_top_k_experts():
    model = tiny_moe("mixtral", top_k=2, experts=4)
    plan = identity_plan(adapter_for(model))
    plan.per_layer[0]["experts"] = [1]
    plan.per_layer[0]["expert_mlp"] = list(range(16, 32))
    with pytest.raises(LopperError, match="router picks 2"):
        validate(plan, adapter_for(model))
    plan.per_layer[0]["experts"], plan.per_layer[0]["expert_mlp"] = [1, 2], list(range(16, 32)) + [33]
    with pytest.raises(LopperError, match="unequal channel counts"):
        validate(plan, adapter_for(model))


def save_and_reload(model, plan: Plan, folder):
    out = io.save(model, folder / "out", source=str(folder / "nowhere"), tokenizer=None, plan=plan, report={},
                  dtype=None)
    config = json.loads((out / "config.json").read_text())
    if config.get("lopper_layout") == "plan":
        return lopper.load(str(out)), False
    return transformers.AutoModelForCausalLM.from_pretrained(out).eval(), True  # plain transformers


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("layout", ["standard", "lopper"])
def test_save_and_reload(family, layout, tmp_path):
    """Widths are multiples of 8 here: the reload uses transformers' default experts kernel (grouped_mm)."""
    model = tiny_moe(family, seed=3, layers=4, experts=4, per=16, shared=16, mlp=16, tied=True,
                     dense=(2,) if family != "mixtral" else ())
    ids = inputs(3)
    adapter = adapter_for(model)
    plan = identity_plan(adapter)
    plan.layers = [0, 2, 3]
    for n, i in enumerate(plan.layers):
        entry = plan.per_layer[i]
        if plan.model["experts"][i]:
            entry["experts"] = [0, 1, 3] if layout == "standard" or n == 0 else [1, 2]
            entry["expert_mlp"] = [e * 16 + j for e in entry["experts"] for j in range(4, 12)]
        for key in ("mlp", "shared_mlp"):
            if plan.model.get(key, [0] * 4)[i]:
                entry[key] = list(range(8))
    # Qwen2-MoE derives head_dim from hidden / heads (transformers 4.57): a hidden cut alone is a lopper layout there
    plan.hidden = list(range(32)) if (family, layout) == ("qwen2_moe", "standard") else list(range(8, 32))
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    standard = surgery.apply(model, adapter, plan)
    assert standard is (layout == "standard")
    got = forward(model, ids)
    assert (got - forward(masked, ids)).abs().max().item() < TOL
    reloaded, plain = save_and_reload(model, plan, tmp_path)
    assert plain is standard
    assert (forward(reloaded, ids) - got).abs().max().item() < TOL
    if standard and family != "mixtral":  # the dense layer moved from index 2 to 1
        assert reloaded.config.mlp_only_layers == [1] and reloaded.config.decoder_sparse_step == 1


@pytest.mark.parametrize("family", MOE)
def test_silent_expert_scores_zero_and_goes_first(family):
    """Experts rank by routing weight x output norm over calibration tokens: an expert whose down_proj is zero
    writes nothing, scores exactly 0 and is the one --experts removes; experts that write score > 0."""
    model = tiny_moe(family, seed=5, experts=4, top_k=2, layers=2, init=0.02)
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.layers():
            layer.mlp.experts.down_proj[2] = 0
    stats = collect(model, adapter, [inputs(i, n=1, length=48) for i in range(4)], quiet=True)
    scores = width_scores(adapter, stats, "activation")
    plan = choose(adapter, Target(experts=0.25), stats, scores)
    for i in plan.layers:
        s = scores.other["experts"][i]
        assert s[2] == 0 and (s[[0, 1, 3]] > 0).all()
        assert plan.per_layer[i]["experts"] == [0, 1, 3]


def test_too_many_experts_removed_is_refused(tmp_path):
    src = tmp_path / "src"
    model = tiny_moe("mixtral", experts=4, top_k=2)
    model.save_pretrained(src)
    with pytest.raises(LopperError, match="router picks 2"):
        lopper.prune(model=str(src), out=str(tmp_path / "out"), experts=0.75, width_metric="magnitude", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", MOE)
def test_fisher_and_magnitude_scores_cover_experts(family):
    """Fisher (w * grad summed per unit over stacked expert tensors) and magnitude score every expert structure;
    an expert whose weights are all zero has magnitude 0 and Fisher 0."""
    from lopper.gradient import fisher_scores

    model = tiny_moe(family, seed=7, experts=4, top_k=2, per=8, init=0.02, dense=(1,) if family != "mixtral" else ())
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.layers():
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts.gate_up_proj[1] = 0
                layer.mlp.experts.down_proj[1] = 0
                layer.mlp.gate.weight[1] = 0
    fisher = fisher_scores(model, adapter, [inputs(i, n=1, length=24) for i in range(3)], quiet=True)
    magnitude = width_scores(adapter, None, "magnitude")
    for scores in (fisher, magnitude):
        for i, layer in enumerate(adapter.layers()):
            if not hasattr(layer.mlp, "experts"):
                continue
            experts, channels = scores.other["experts"][i], scores.other["expert_mlp"][i]
            assert experts.shape == (4,) and channels.shape == (32,)
            assert torch.isfinite(experts).all() and experts[1] == 0 and (experts[[0, 2, 3]] > 0).all()
            assert (channels.view(4, 8)[1] == 0).all() and (channels.view(4, 8)[0] > 0).all()
