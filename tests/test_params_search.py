"""--params-search kl (the default) and loss: depth/width mixes are cut, repaired and scored at the same parameter
count and the lowest score wins; the walk goes outward while the best mix is at an edge; --depth-share and the
rule decide without measuring."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lopper
from lopper.arch import adapter_for
from lopper.importance import collect, width_scores
from lopper.select import SEARCH_SHARES, Target, solve_params
from tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loss_search_keeps_the_lowest_loss_mix(model_dir, tmp_path, family):
    src = model_dir(family, layers=6, heads=4, kv_heads=2, head_dim=8, mlp=64)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.3, params_search="loss",
                          calib_samples=8, seq_len=32, round_to=4, quiet=True)
    chosen = report["plan"]["params"]
    candidates = chosen["candidates"]
    assert len({c["drop_layers"] for c in candidates}) >= 2  # several mixes were really tried
    assert all(abs(c["removed"] - 0.3) <= 0.02 for c in candidates)
    best = min(candidates, key=lambda c: c["loss"])
    assert chosen["choice"]["drop_layers"] == best["drop_layers"]
    assert json.loads((tmp_path / "out" / "lopper_report.json").read_text())["plan"]["params"] == chosen


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_depth_share_sets_the_layers_of_a_params_cut(model_dir, tmp_path, share):
    src = model_dir("llama", layers=6, heads=4, kv_heads=2, head_dim=8, mlp=64)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=0.33, depth_share=share,
                       calib_samples=4, seq_len=16, round_to=4, quiet=True)
    chosen = plan.meta["params"]
    assert abs(chosen["removed"] - 0.33) <= 0.02
    expected = 0 if share == 0.0 else 2  # round(1.0 * 0.33 * 6) layers; width makes up the rest
    assert chosen["choice"]["drop_layers"] == expected


def test_default_search_keeps_the_lowest_kl_mix(model_dir, tmp_path):
    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.33, calib_samples=8, seq_len=16,
                          round_to=4, quiet=True)
    chosen = report["plan"]["params"]
    assert chosen["search"] == "kl"
    candidates = chosen["candidates"]
    assert len({c["drop_layers"] for c in candidates}) >= 2  # 0.25 and 0.5 by depth, and one further out
    assert all(abs(c["removed"] - 0.33) <= 0.02 and c["kl"] >= 0 for c in candidates)
    assert chosen["choice"]["drop_layers"] == min(candidates, key=lambda c: c["kl"])["drop_layers"]


def test_rule_takes_half_by_depth(model_dir, tmp_path):
    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=0.5, params_search="rule",
                       calib_samples=4, seq_len=16, round_to=4, quiet=True)
    chosen = plan.meta["params"]
    assert abs(chosen["removed"] - 0.5) <= 0.02
    assert chosen["choice"]["drop_layers"] == 2  # round(0.5 * 0.5 * 8); three quarters would drop 3
    assert "search" not in chosen and len(chosen["candidates"]) == 1


def walk_setup():
    torch.manual_seed(0)
    model = tiny_model("llama", layers=10, heads=4, kv_heads=2, head_dim=8, mlp=64)
    adapter = adapter_for(model)
    ids = [torch.randint(3, 96, (1, 16)) for _ in range(2)]
    stats = collect(model, adapter, ids, quiet=True)
    return model, adapter, stats, width_scores(adapter, stats, "activation")


FRAC = 0.4  # 4 of 10 layers at share 1: every share is a different layer count
LAYERS_AT = {round(s * FRAC * 10): s for s in SEARCH_SHARES}


@settings(max_examples=8, deadline=None)
@given(best=st.sampled_from(SEARCH_SHARES))
def test_walk_goes_deeper_only_while_depth_wins(best):
    """A score that is lowest at one share and grows away from it (one value per plan, no noise to weigh): the walk
    scores width only and half by depth, then deeper while the deepest is the best; a best at 0.25, between the two
    it starts from, loses to width only on the tie."""
    model, adapter, stats, scores = walk_setup()
    p = solve_params(model, adapter, Target(round_to=4), stats, scores, FRAC, metric="kl",
                     score=lambda plan: abs(LAYERS_AT[10 - len(plan.layers)] - best))
    chosen = p.meta["params"]
    scored = sorted(LAYERS_AT[c["drop_layers"]] for c in chosen["candidates"])
    deepest = max(2, SEARCH_SHARES.index(best) + 1 if best >= 0.5 else 2)
    assert scored == [0.0] + list(SEARCH_SHARES[2:min(deepest, 4) + 1])
    assert LAYERS_AT[chosen["choice"]["drop_layers"]] == (best if best != 0.25 else 0.0)


@pytest.mark.parametrize("gap,picked", [(0.3, 0.0), (3.0, 0.5)])
def test_more_depth_must_win_by_more_than_one_standard_error(gap, picked):
    """Half by depth lower than width only on average by `gap` standard errors of the paired per-window difference:
    within one, the fewer dropped layers win; beyond it, the depth (and then 0.75 is scored, and loses)."""
    from lopper.search import Score
    model, adapter, stats, scores = walk_setup()
    noise = [0.1, -0.1, 0.2, -0.2, 0.05, -0.05, 0.15, -0.15]
    stderr = (sum(x * x for x in noise) / (len(noise) - 1) / len(noise)) ** 0.5
    level = {0.0: 1.0, 0.5: 1.0 - gap * stderr, 0.75: 1.5, 1.0: 2.0}

    def score(plan):
        share = LAYERS_AT[10 - len(plan.layers)]
        return Score([level[share] + (x if share == 0.0 else 0.0) for x in noise])

    p = solve_params(model, adapter, Target(round_to=4), stats, scores, FRAC, metric="kl", score=score)
    chosen = p.meta["params"]
    assert LAYERS_AT[chosen["choice"]["drop_layers"]] == picked
    assert sorted(LAYERS_AT[c["drop_layers"]] for c in chosen["candidates"]) == ([0.0, 0.5] if picked == 0.0 else
                                                                                 [0.0, 0.5, 0.75])
    width = next(c for c in chosen["candidates"] if c["drop_layers"] == 0)
    assert width["vs_lowest"]["mean"] == pytest.approx(gap * stderr, abs=1e-6) and "windows" not in width


def test_explicit_share_is_not_second_guessed(model_dir, tmp_path):
    src = model_dir("llama", layers=3, heads=4, kv_heads=2, head_dim=8, mlp=64)  # one free layer: a third of the model
    with pytest.raises(lopper.LopperError, match="cannot be reached"):
        lopper.plan(model=str(src), out=str(tmp_path / "p2.json"), params=0.25, depth_share=1.0, calib_samples=4,
                    seq_len=16, round_to=4, quiet=True)


@pytest.mark.parametrize("kwargs, message", [(dict(depth_share=0.5), "needs --params"),
                                             (dict(params=0.3, depth_share=1.5), "0 <= F <= 1"),
                                             (dict(params=0.3, depth_share=0.5, params_search="loss"),
                                              "drop --depth-share")])
def test_depth_share_is_checked(model_dir, kwargs, message):
    src = model_dir("llama", layers=4, heads=4, kv_heads=2, head_dim=8, mlp=64)
    with pytest.raises(lopper.LopperError, match=message):
        lopper.plan(model=str(src), quiet=True, **kwargs)


def test_the_cut_is_logged_once_not_the_trials(model_dir, tmp_path, caplog):
    """The search plans and cuts many candidates on copies; only the cut that is made reaches the log."""
    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    with caplog.at_level("INFO", logger="lopper"):
        lopper.plan(model=str(src), out=str(tmp_path / "warm.json"), params=0.33, calib_samples=4, seq_len=16,
                    round_to=4, params_search="rule")  # the logger has let INFO through once before the search
        caplog.clear()
        report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.33, calib_samples=8, seq_len=16,
                              round_to=4)
    assert len(report["plan"]["params"]["candidates"]) >= 2
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("config.intermediate_size:") for m in lines) == 1, lines
    assert sum(m.startswith("candidate:") for m in lines) == len(report["plan"]["params"]["candidates"])


def test_report_times_each_phase(model_dir, tmp_path):
    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.33, calib_samples=8, seq_len=16,
                          round_to=4, quiet=True)
    phases = report["phases_seconds"]
    assert {"load", "calibration", "plan", "search", "repair"} <= set(phases)
    assert phases["search"] == report["plan"]["params"]["seconds"] > 0
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= report["seconds"] + 1.0  # the phases split the run, never count a part twice


def test_the_saved_model_is_the_one_the_search_scored(model_dir, tmp_path):
    """The search scores each candidate cut and repaired as the run makes it, on windows beyond the repair's, and
    saves the winner itself: its score, recomputed on the saved folder, is the winning candidate's."""
    from lopper.evaluate import calibration_loss, teacher_outputs
    from lopper.io import load_model
    from lopper.select import SEARCH_HELD
    from lopper.text import generated_windows

    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.33, calib_samples=8, seq_len=16,
                          round_to=4, quiet=True)
    chosen = report["plan"]["params"]
    best = min(chosen["candidates"], key=lambda c: c["kl"])
    original, tok, _ = load_model(str(src))
    held = generated_windows(original, tok, 8 + SEARCH_HELD, 16)[8:]
    saved = lopper.load(str(tmp_path / "out"))
    kl = calibration_loss(saved, held, teacher_outputs(original, held, log_probs=True))
    assert kl == pytest.approx(best["kl"], rel=1e-3, abs=1e-6)
    assert report["plan"]["units"].startswith("MLP channels chosen by the repair")  # the repaired plan was saved


def test_a_calibration_file_too_short_for_the_search_says_so(model_dir, tmp_path):
    src = model_dir("llama", layers=4, heads=4, kv_heads=2, head_dim=8, mlp=64)
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(40)))  # about 110 tokens: 4 windows of 16, not 12
    with pytest.raises(lopper.LopperError, match="scores its candidates on 32 windows beyond --calib-samples 4"):
        lopper.plan(model=str(src), out=str(tmp_path / "p.json"), params=0.3, calib=str(text), calib_samples=4,
                    seq_len=16, quiet=True)
    lopper.plan(model=str(src), out=str(tmp_path / "p.json"), params=0.3, calib=str(text), calib_samples=4,
                seq_len=16, params_search="rule", quiet=True)  # enough for the windows themselves


def test_cut_search_scores_each_cut_before_repair_and_repairs_the_kept_one(model_dir, tmp_path):
    """--params-search cut: each candidate's KL is that of the unrepaired cut on the held windows (recomputed here
    by cutting the original with the kept plan), the lowest is kept, and prune repairs that cut once."""
    import copy

    from lopper.evaluate import calibration_loss, teacher_outputs
    from lopper.io import load_model
    from lopper.select import SEARCH_HELD
    from lopper.surgery import apply
    from lopper.text import generated_windows

    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    kw = dict(params=0.33, params_search="cut", calib_samples=8, seq_len=16, round_to=4, quiet=True)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), **kw)
    chosen = plan.meta["params"]
    assert chosen["search"] == "kl_cut" and len({c["drop_layers"] for c in chosen["candidates"]}) >= 2
    best = min(chosen["candidates"], key=lambda c: c["kl_cut"])
    assert chosen["choice"]["drop_layers"] == best["drop_layers"]
    original, tok, _ = load_model(str(src))
    held = generated_windows(original, tok, 8 + SEARCH_HELD, 16)[8:]
    cut = copy.deepcopy(original)
    apply(cut, adapter_for(cut), plan)
    kl = calibration_loss(cut, held, teacher_outputs(original, held, log_probs=True))
    assert kl == pytest.approx(best["kl_cut"], rel=1e-3, abs=1e-7)
    report = lopper.prune(model=str(src), out=str(tmp_path / "out"), **kw)
    assert report["plan"]["params"]["choice"] == chosen["choice"]
    assert report["plan"]["units"].startswith("MLP channels chosen by the repair")  # repaired once, after the search


@pytest.mark.parametrize("protect_first", [1, 0])
def test_the_search_repairs_on_one_teacher_stream_exactly_as_each_repair_alone(model_dir, tmp_path, monkeypatch,
                                                                               protect_first):
    """The unpruned stream computed once for every candidate (repair.TeacherStream) gives the models that each
    candidate's own repair gives, weight for weight (also when the first layers are dropped)."""
    import importlib

    from safetensors.torch import load_file
    src = model_dir("llama", layers=6, heads=4, kv_heads=2, head_dim=8, mlp=64)
    kw = dict(params=0.33, calib_samples=6, seq_len=16, round_to=4, quiet=True, protect_first=protect_first)
    a = lopper.prune(model=str(src), out=str(tmp_path / "a"), **kw)
    monkeypatch.setattr(importlib.import_module("lopper.api"), "teacher_stream", lambda *args: None)
    b = lopper.prune(model=str(src), out=str(tmp_path / "b"), **kw)
    assert a["plan"]["params"]["candidates"] == [{**c, "seconds": x["seconds"]} for c, x in
                                                 zip(b["plan"]["params"]["candidates"],
                                                     a["plan"]["params"]["candidates"])]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
