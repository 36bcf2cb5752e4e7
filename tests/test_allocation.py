"""--allocation global: per-layer widths from one ranking across layers keep exactly the uniform total, respect the
per-layer minimum, round_to and the GQA rule, cut exactly (pruned == masked), save and reload through lopper.load,
and replay from their plan; --params reaches its target with them."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lopper
from lopper.allocate import global_mlp
from lopper import surgery
from lopper.arch import adapter_for
from lopper.cli import main
from lopper.errors import LopperError
from lopper.importance import width_scores
from lopper.plan import Plan, validate
from lopper.select import Target, choose
from families import INIT, REGISTRY
from test_families import check_pruned_equals_masked
from tiny import tiny_model, tiny_tokenizer

FAST = dict(calib_samples=4, seq_len=32, quiet=True, repair="none")  # exact equality with the masked original


def skew(model, seed: int, spread: float = 2.0):
    """Scale each layer's MLP channels (up_proj rows, down_proj columns) and query heads (q_proj rows, o_proj
    columns) by exp(s_l * z), with a different spread s_l per layer, so that layers differ in the size and spread of
    their scores: a global ranking then gives them different widths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_for(model).layers():
            s = spread * torch.rand((), generator=g)
            down = layer.mlp.down_proj.weight
            channels = torch.exp(s * torch.randn(down.shape[1], generator=g))
            down.mul_(channels[None])
            layer.mlp.up_proj.weight.mul_(channels[:, None])
            o = layer.self_attn.o_proj.weight
            hd = model.config.head_dim
            heads = torch.exp(s * torch.randn(o.shape[1] // hd, generator=g)).repeat_interleave(hd)
            o.mul_(heads[None])
            layer.self_attn.q_proj.weight.mul_(heads[:, None])
    return model


@st.composite
def cases(draw):
    family = draw(st.sampled_from(["llama", "qwen2", "mistral"]))
    kv = draw(st.integers(2, 3))
    group = draw(st.integers(1, 3))
    arch = dict(family=family, seed=draw(st.integers(0, 2**16)), layers=draw(st.integers(3, 5)), heads=kv * group,
                kv_heads=kv, head_dim=4, mlp=draw(st.sampled_from([32, 40, 64])), tied=draw(st.booleans()))
    heads = draw(st.sampled_from([0.0, 1 / kv, 0.5]))
    target = Target(mlp=draw(st.sampled_from([0.25, 0.5, 0.75])), heads=heads, round_to=draw(st.sampled_from([1, 4, 8])),
                    min_keep=draw(st.sampled_from([0.1, 0.25, 0.5])), allocation="global")
    return arch, target


def plans_for(model, target: Target) -> tuple[Plan, Plan]:
    adapter = adapter_for(model)
    scores = width_scores(adapter, None, "magnitude")
    uniform = choose(adapter, Target(**{**vars(target), "allocation": "uniform"}), None, scores)
    return choose(adapter, target, None, scores), uniform


def totals(plan: Plan) -> dict[str, int]:
    w = plan.widths()
    return {k: sum(w[i][k] for i in plan.layers) for k in w[plan.layers[0]]}


@settings(max_examples=15, deadline=None)
@given(case=cases())
def test_global_keeps_the_uniform_total_minimums_rounding_and_gqa(case):
    arch, target = case
    model = skew(tiny_model(init=INIT, attn="eager", **arch), arch["seed"])
    adapter = adapter_for(model)
    plan, uniform = plans_for(model, target)
    validate(plan, adapter)  # includes the GQA rule: kept heads in kept groups, the same count per group
    assert plan.layers == uniform.layers
    assert totals(plan) == totals(uniform)
    mlp0, n_heads, n_kv = arch["mlp"], arch["heads"], arch["kv_heads"]
    uni = uniform.widths()[plan.layers[0]]
    for i, w in plan.widths().items():
        k = target.round_to
        assert w["mlp"] % k == 0 or w["mlp"] == uni["mlp"]
        assert w["mlp"] >= min(uni["mlp"], math.ceil(target.min_keep * mlp0 / k - 1e-9) * k)
        if uni["kv_heads"] < n_kv:  # whole groups go: every kept group keeps all its heads
            assert w["kv_heads"] >= min(uni["kv_heads"], math.ceil(target.min_keep * n_kv - 1e-9))
            assert w["heads"] == w["kv_heads"] * (n_heads // n_kv)
        else:
            assert w["kv_heads"] == n_kv
            assert w["heads"] >= n_kv * min(uni["heads"] // n_kv, math.ceil(target.min_keep * n_heads / n_kv - 1e-9))


def test_a_layer_with_few_strong_channels_gets_the_minimum_and_the_others_the_rest():
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=8, mlp=64, init=INIT)
    with torch.no_grad():
        mlp = model.model.layers[1].mlp  # 8 strong channels, 56 near zero
        mlp.down_proj.weight[:, 8:] *= 0.01
        mlp.gate_proj.weight[8:] *= 0.01
        mlp.up_proj.weight[8:] *= 0.01
    plan, uniform = plans_for(model, Target(mlp=0.5, round_to=8, min_keep=0.25, allocation="global"))
    assert [w["mlp"] for w in uniform.widths().values()] == [32, 32, 32]
    widths = [w["mlp"] for w in plan.widths().values()]
    assert widths[1] == 16 and sum(widths) == 96 and min(widths[0], widths[2]) > 32, widths  # 16 = 0.25 x 64
    assert set(range(8)) <= set(plan.per_layer[1]["mlp"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@settings(max_examples=6, deadline=None)
@given(case=cases())
def test_global_plans_cut_exactly(family, case):
    arch, target = case
    arch = {**arch, "family": family}

    def plan_of(adapter):
        skew(adapter.model, arch["seed"], spread=1.0)  # larger spreads give logits whose float32 rounding alone
        # exceeds the tolerance
        plan, _ = plans_for(adapter.model, target)
        assume(len({(w["mlp"], w["heads"]) for w in plan.widths().values()}) > 1)  # non-uniform widths only
        return plan

    check_pruned_equals_masked(REGISTRY[family], arch, plan_of)


def skewed_folder(tmp_path, family: str):
    """Skewed, and layer l has 6 l dead MLP channels (zero weights): whatever the calibration text, a global ranking
    removes those first, so the widths differ between layers."""
    model = skew(tiny_model(family, layers=4, heads=4, kv_heads=2, head_dim=8, mlp=32, init=INIT), seed=3, spread=3)
    with torch.no_grad():
        for l, layer in enumerate(adapter_for(model).layers()):
            layer.mlp.gate_proj.weight[:6 * l] = 0
            layer.mlp.up_proj.weight[:6 * l] = 0
            layer.mlp.down_proj.weight[:, :6 * l] = 0
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_global_prune_saves_reloads_and_replays(family, tmp_path):
    src = skewed_folder(tmp_path, family)
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), out=str(out), mlp=0.5, heads=0.5, allocation="global", round_to=4,
                          **FAST)
    mlp = report["structures"]["mlp"]["after"]
    assert isinstance(mlp, list) and len(set(mlp)) > 1, mlp  # really non-uniform
    assert sum(mlp) == 4 * 16
    assert report["standard_checkpoint"] is False

    plan = Plan.load(out / "lopper_plan.json")
    assert plan.meta["target"]["allocation"] == "global"
    expected = lopper.load(str(src))
    surgery.apply(expected, adapter_for(expected), plan)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    reloaded = lopper.load(str(out))
    assert (logits(reloaded, ids) - logits(expected, ids)).abs().max().item() < 1e-5
    assert sum(p.numel() for p in reloaded.parameters()) == report["params_after"]

    again = tmp_path / "again"
    assert main(["prune", str(src), "--plan", str(out / "lopper_plan.json"), "--out", str(again), "--quiet"]) == 0
    assert torch.equal(logits(lopper.load(str(again)), ids), logits(reloaded, ids))


def test_repair_chosen_channels_are_saved_and_replay(tmp_path):
    """With --repair lsq the repair re-chooses MLP channels (greedy OBS): the saved plan names them, so replaying it
    with the same repair gives the same weights, and the counts are the planned ones."""
    src = skewed_folder(tmp_path, "llama")
    dry = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), mlp=0.5, allocation="global", round_to=4,
                      **FAST)
    out, again = tmp_path / "out", tmp_path / "again"
    lopper.prune(model=str(src), out=str(out), mlp=0.5, allocation="global", round_to=4, **{**FAST, "repair": "lsq"})
    saved = Plan.load(out / "lopper_plan.json")
    assert saved.widths() == dry.widths()
    assert "OBS" in saved.meta["units"]
    lopper.prune(model=str(src), out=str(again), plan=str(out / "lopper_plan.json"), **{**FAST, "repair": "lsq"})
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logits(lopper.load(str(again)), ids), logits(lopper.load(str(out)), ids), atol=1e-5)


def test_params_with_global_allocation_meets_the_target_exactly_as_counted(tmp_path):
    src = skewed_folder(tmp_path, "llama")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--out", str(out), "--params", "0.25", "--allocation", "global",
                 "--round-to", "4", "--calib-samples", "4", "--seq-len", "32", "--quiet"]) == 0
    report = json.loads((out / "lopper_report.json").read_text())
    removed = 1 - report["params_non_embedding_after"] / report["params_non_embedding_before"]
    assert abs(removed - 0.25) <= 0.03, removed
    assert report["plan"]["params"]["removed"] == pytest.approx(removed, abs=1e-4)
    assert report["plan"]["target"]["allocation"] == "global"


@pytest.mark.parametrize("frac,layers", [(0.3, 0), (0.5, 3)])
def test_params_with_global_allocation_drops_layers_only_past_the_measured_threshold(model_dir, tmp_path, frac,
                                                                                      layers):
    src = model_dir("llama", layers=16, mlp=64)
    report = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=frac, allocation="global",
                         round_to=4, **FAST)
    assert 16 - len(report.layers) == layers  # none up to 35%, then 1.25 x the excess (select.global_depth_share)
    assert report.meta["params"]["choice"]["drop_layers"] == layers
    assert abs(report.meta["params"]["removed"] - frac) <= 0.02


@pytest.mark.parametrize("bad,message", [({"allocation": "layerwise"}, "--allocation"),
                                         ({"min_keep": 0.0}, "--min-keep"), ({"min_keep": 1.5}, "--min-keep")])
def test_bad_allocation_options_are_refused(bad, message, tmp_path):
    with pytest.raises(LopperError, match=message):
        lopper.prune(model="unused", out=str(tmp_path / "o"), mlp=0.5, **bad)


def test_global_widths_ignore_a_layer_scale_that_grows_with_depth():
    """A real model's residual stream (and so every activation score written into it) grows with depth; two layers
    whose scores differ only by that scale must keep the same width (allocate.NORMALIZE = "zscore"; raw scores gave
    8 and 64 channels here)."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g)
    spread = torch.cat([torch.full((32,), 0.1), torch.full((32,), 0.9)])
    scores = {0: base, 1: base * 20.0, 2: spread}
    kept = global_mlp(scores, [0, 1, 2], keep=32, k=8, full=64, min_keep=0.125)
    assert len(kept[0]) == len(kept[1])
    assert sum(len(v) for v in kept.values()) == 3 * 32
