"""--params-search loss: every depth/width mix is tried at the same parameter count and the lowest loss wins."""
import json

import pytest

import lopper


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


def test_default_params_cut_takes_three_quarters_by_depth(model_dir, tmp_path):
    src = model_dir("llama", layers=8, heads=4, kv_heads=2, head_dim=8, mlp=64)
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=0.33, calib_samples=4, seq_len=16,
                       round_to=4, quiet=True)
    chosen = plan.meta["params"]
    assert abs(chosen["removed"] - 0.33) <= 0.02
    assert chosen["choice"]["drop_layers"] == 2  # round(0.75 * 0.33 * 8); half by depth would drop 1


def test_default_rule_takes_fewer_layers_where_one_layer_overshoots(model_dir, tmp_path):
    src = model_dir("llama", layers=3, heads=4, kv_heads=2, head_dim=8, mlp=64)  # one free layer: a third of the model
    plan = lopper.plan(model=str(src), out=str(tmp_path / "plan.json"), params=0.25, calib_samples=4, seq_len=16,
                       round_to=4, quiet=True)
    assert plan.meta["params"]["choice"]["drop_layers"] == 0  # round(0.75 * 0.25 * 3) = 1 would remove 33%
    assert abs(plan.meta["params"]["removed"] - 0.25) <= 0.02
    with pytest.raises(lopper.LopperError, match="cannot be reached"):  # an explicit share is not second-guessed
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
