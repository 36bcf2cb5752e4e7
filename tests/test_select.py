"""Importance and selection, checked with numbers: layers that do nothing score ~0 and go first, the angular metric
cuts a contiguous block, protected layers stay, GQA head fractions cut whole groups or heads within groups, widths
are rounded and never empty, scores follow weight magnitude, and --params hits its target."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lopper
from lopper.arch import adapter_for
from lopper.importance import block_angular, block_influence, collect, width_scores
from lopper.select import Target, choose
from tiny import DECODERS, tiny_model, tiny_tokenizer

FAST = {"calib_samples": 4, "seq_len": 32, "quiet": True, "repair": "none"}  # exact equality with the masked original


def windows(vocab: int, n: int = 4, length: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]


def silence(model, layers) -> None:
    """Zero the writers (o_proj, down_proj) of `layers`: each then passes its input through unchanged."""
    adapter = adapter_for(model)
    with torch.no_grad():
        for i in layers:
            for m in adapter.writers(adapter.layers()[i]):
                m.weight.zero_()
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()


def stats_of(model):
    return collect(model, adapter_for(model), windows(model.config.vocab_size), quiet=True)


def dropped(plan, n: int) -> list[int]:
    return sorted(set(range(n)) - set(plan.layers))


def layer_choice(model, stats, **target) -> list[int]:
    adapter = adapter_for(model)
    plan = choose(adapter, Target(**target), stats, width_scores(adapter, None, "magnitude"))
    return dropped(plan, len(adapter.layers()))


def save_with_tokenizer(model, folder):
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return str(folder)


# ---- layers --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)  # (BERT is post-norm: a layer with zero writers still re-normalises)
def test_block_influence_of_a_silent_layer_is_zero_and_it_is_dropped(family):
    model = tiny_model(family, layers=5, init=0.2)
    silence(model, [2])
    stats = stats_of(model)
    bi = block_influence(stats)
    assert len(bi) == 5
    assert abs(bi[2]) < 1e-5
    assert min(bi[i] for i in (0, 1, 3, 4)) > 1e-3
    assert layer_choice(model, stats, drop_layers=1) == [2]


def test_silent_layer_is_dropped_through_the_api(tmp_path):
    model = tiny_model("mistral", layers=5, init=0.2)
    silence(model, [3])
    src = save_with_tokenizer(model, tmp_path / "model")
    plan = lopper.plan(model=src, out=str(tmp_path / "plan.json"), drop_layers=1, **FAST)
    assert plan.layers == [0, 1, 2, 4]
    assert json.loads((tmp_path / "plan.json").read_text())["layers"] == [0, 1, 2, 4]


def test_block_influence_matches_hidden_states():
    """BI_l = 1 - mean over tokens of cos(x_l, x_{l+1}), x_l the residual stream entering layer l."""
    model = tiny_model("llama", layers=4, init=0.2)
    ws = windows(96)
    stats = collect(model, adapter_for(model), ws, quiet=True)
    with torch.no_grad():
        hs = [model(input_ids=w, output_hidden_states=True).hidden_states for w in ws]
    for layer in range(3):  # hidden_states[l] enters layer l (the last entry is after the final norm)
        cos = torch.cat([torch.cosine_similarity(h[layer][0], h[layer + 1][0], dim=-1) for h in hs])
        assert block_influence(stats)[layer] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
        ang = torch.cat([torch.arccos(torch.cosine_similarity(h[layer][0], h[min(layer + 2, 3)][0], dim=-1)
                                      .clamp(-1, 1)) / math.pi for h in hs])
        if layer + 2 <= 3:
            assert block_angular(stats, 2)[layer] == pytest.approx(ang.mean().item(), abs=1e-4)


def test_angular_metric_drops_a_contiguous_block():
    model = tiny_model("qwen2", layers=6, init=0.2)
    silence(model, [1, 4])  # the two cheapest single layers are apart
    stats = stats_of(model)
    assert layer_choice(model, stats, drop_layers=2) == [1, 4]  # BI takes them one by one
    gone = layer_choice(model, stats, drop_layers=2, layer_metric="angular")
    assert gone[1] == gone[0] + 1
    dist = block_angular(stats, 2)
    assert gone[0] == min(range(1, 4), key=lambda i: dist[i])  # the closest block among unprotected starts 1..3
    gone3 = layer_choice(model, stats, drop_layers=3, layer_metric="angular")
    assert gone3 == list(range(gone3[0], gone3[0] + 3))


def test_angular_metric_finds_a_silent_block():
    model = tiny_model("llama", layers=6, init=0.2)
    silence(model, [2, 3])
    stats = stats_of(model)
    assert block_angular(stats, 2)[2] < 1e-3
    assert layer_choice(model, stats, drop_layers=2, layer_metric="angular") == [2, 3]


@pytest.fixture(scope="module")
def edge_silent():
    """6 layers whose first and last do nothing: unprotected, they would be the first to go."""
    model = tiny_model("llama", layers=6, init=0.2)
    silence(model, [0, 5])
    return model, stats_of(model)


def test_protection_is_what_keeps_the_edges(edge_silent):
    model, stats = edge_silent
    assert layer_choice(model, stats, drop_layers=1, protect_first=0, protect_last=1) == [0]
    assert layer_choice(model, stats, drop_layers=1, protect_first=1, protect_last=0) == [5]
    assert set(layer_choice(model, stats, drop_layers=1)).isdisjoint({0, 5})


@settings(max_examples=25, deadline=None)
@given(first=st.integers(0, 3), last=st.integers(0, 3), metric=st.sampled_from(["bi", "angular"]), data=st.data())
def test_protected_layers_are_never_dropped(edge_silent, first, last, metric, data):
    model, stats = edge_silent
    free = 6 - first - last
    drop = data.draw(st.integers(0, max(free, 0)), label="drop_layers")
    gone = layer_choice(model, stats, drop_layers=drop, protect_first=first, protect_last=last, layer_metric=metric)
    assert len(gone) == drop
    assert all(first <= i < 6 - last for i in gone)


def test_dropping_more_than_the_unprotected_layers_is_refused(edge_silent):
    model, stats = edge_silent
    with pytest.raises(lopper.LopperError, match="--drop-layers 3"):
        layer_choice(model, stats, drop_layers=3, protect_first=2, protect_last=2)


# ---- heads ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DECODERS)
def test_half_the_heads_of_two_kv_groups_is_one_whole_group(family, model_dir, tmp_path):
    src = model_dir(family, layers=3, heads=4, kv_heads=2, head_dim=8)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), heads=0.5, **FAST)
    for i in plan.layers:
        entry = plan.per_layer[i]
        assert len(entry["kv_heads"]) == 1
        g = entry["kv_heads"][0]
        assert entry["heads"] == [2 * g, 2 * g + 1]  # both query heads of the kept group


@pytest.mark.parametrize("family", DECODERS)
def test_a_quarter_of_the_heads_with_four_per_group_keeps_every_group(family, model_dir, tmp_path):
    # head_dim 6: hidden 48 is a multiple of 6 kept heads (LlamaConfig's rule)
    src = model_dir(family, layers=3, heads=8, kv_heads=2, head_dim=6)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), heads=0.25, **FAST)
    for i in plan.layers:
        entry = plan.per_layer[i]
        assert entry["kv_heads"] == [0, 1]
        assert len(entry["heads"]) == 6
        assert [h // 4 for h in entry["heads"]] == [0, 0, 0, 1, 1, 1]  # 3 query heads in each group
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), plan=str(tmp_path / "plan.json"), out=str(out), quiet=True)
    assert report["structures"]["heads"] == {"before": 8, "after": 6}
    assert report["structures"]["kv_heads"] == {"before": 2, "after": 2}
    assert report["standard_checkpoint"] is True


# ---- widths --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def width_models():
    return {mlp: tiny_model("qwen2", layers=2, heads=4, kv_heads=2, head_dim=8, mlp=mlp) for mlp in (16, 24, 40)}


@settings(max_examples=30, deadline=None)
@given(mlp=st.sampled_from([16, 24, 40]), frac=st.floats(0.0, 0.99), round_to=st.sampled_from([1, 2, 4, 8]),
       hidden=st.floats(0.0, 0.9))
def test_widths_are_multiples_of_round_to_and_never_zero(width_models, mlp, frac, round_to, hidden):
    adapter = adapter_for(width_models[mlp])
    plan = choose(adapter, Target(mlp=frac, hidden=hidden, round_to=round_to), None,
                  width_scores(adapter, None, "magnitude"))
    widths = {len(plan.per_layer[i]["mlp"]) for i in plan.layers}
    assert len(widths) == 1
    kept = widths.pop()
    assert kept > 0 and kept % round_to == 0 and kept <= mlp
    if frac:
        assert abs(kept - mlp * (1 - frac)) <= round_to / 2 + 1e-9 or kept == round_to
    else:
        assert kept == mlp
    assert len(plan.hidden) > 0 and len(plan.hidden) % round_to == 0


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("metric", ["magnitude", "activation"])
def test_scores_rank_a_scaled_up_unit_first(family, metric):
    """Each unit's score sums all its weights: a unit scaled up on its input side only, or on its output side only,
    ranks above the untouched ones."""
    model = tiny_model(family, layers=3, heads=4, kv_heads=2, head_dim=8, mlp=24)
    adapter = adapter_for(model)
    layer = adapter.layers()[1]
    reader_side, writer_side, head = 7, 15, 2
    with torch.no_grad():
        for m in adapter.mlp_in(layer):
            m.weight[reader_side] *= 10  # gate/up rows (BERT: intermediate.dense)
        # down_proj column (BERT: output.dense); the activation metric weighs it by the channel's (small) activation
        # norm, against the hidden-state norms that weigh the gate/up rows, so it takes a bigger push there
        adapter.mlp_out(layer).weight[:, writer_side] *= 10 if metric == "magnitude" else 100
        adapter.writers(layer)[0].weight[:, head * 8:(head + 1) * 8] *= 10  # o_proj columns of one head
    stats = stats_of(model) if metric == "activation" else None
    scores = width_scores(adapter, stats, metric)
    top2 = set(scores.mlp[1].topk(2).indices.tolist())
    assert top2 == {reader_side, writer_side}
    if metric == "magnitude":
        assert scores.mlp[1][[reader_side, writer_side]].min() > 2 * scores.mlp[1].sort().values[-3]
    assert scores.heads[1].argmax().item() == head
    if family != "bert":
        assert scores.kv_heads[1].argmax().item() == head // 2  # a group's score includes its query heads
    for other in (0, 2):  # the other layers are untouched: no unit stands out like that
        assert scores.mlp[other].max() < 2 * scores.mlp[other].sort().values[-3]
    # and selection keeps them even under heavy cuts
    plan = choose(adapter, Target(mlp=0.9, heads=0.5, round_to=1), stats, scores)
    assert {reader_side, writer_side} <= set(plan.per_layer[1]["mlp"])
    assert head in plan.per_layer[1]["heads"]


def test_magnitude_scores_hidden_channels():
    model = tiny_model("qwen3", layers=2)
    adapter = adapter_for(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] *= 20
    scores = width_scores(adapter, None, "magnitude")
    assert scores.hidden.argmax().item() == 5
    plan = choose(adapter, Target(hidden=0.75, round_to=1), None, scores)
    assert 5 in plan.hidden and len(plan.hidden) == 8


# ---- parameter target ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "bert"])
@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_params_target_is_met_within_three_points(family, frac, model_dir, tmp_path):
    shape = dict(layers=6, heads=4, head_dim=8, mlp=64)
    src = model_dir(family, **shape, **({} if family == "bert" else {"kv_heads": 2}))
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), out=str(out), params=frac, **FAST)
    saved = json.loads((out / "lopper_report.json").read_text())
    assert saved["params_non_embedding_after"] == report["params_non_embedding_after"]
    removed = 1 - saved["params_non_embedding_after"] / saved["params_non_embedding_before"]
    assert abs(removed - frac) <= 0.03, removed
    assert saved["plan"]["params"]["target"] == frac
    assert saved["plan"]["params"]["removed"] == pytest.approx(removed, abs=1e-3)
