"""The defaults a user gets with no option: `--repair auto` repairs whenever something is removed (and replays as
the saved run did), so `--params F` alone gives a repaired standard checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

import lopper
from lopper.plan import Plan
from tiny import save_tiny

FAST = {"calib_samples": 4, "seq_len": 32, "quiet": True}


def weights(folder):
    model = lopper.load(str(folder))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_repair_auto_repairs_a_cut_and_a_replay_repeats_it(model_dir, tmp_path):
    src = model_dir("llama")
    auto = lopper.prune(model=str(src), out=str(tmp_path / "auto"), mlp=0.5, **FAST)
    lopper.prune(model=str(src), out=str(tmp_path / "lsq"), mlp=0.5, repair="lsq", **FAST)
    off = lopper.prune(model=str(src), out=str(tmp_path / "off"), mlp=0.5, repair="none", **FAST)
    assert auto["args"]["repair"] == "lsq" and auto["plan"]["repair"] == "lsq"
    assert off["plan"]["repair"] == "none"
    a, b, c = weights(tmp_path / "auto"), weights(tmp_path / "lsq"), weights(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].shape == c[k].shape)  # the repair changed weights

    again = lopper.prune(model=str(src), out=str(tmp_path / "again"), plan=str(tmp_path / "auto" / "lopper_plan.json"),
                         **FAST)
    assert again["args"]["repair"] == "lsq"
    d = weights(tmp_path / "again")
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_repair_auto_replays_an_older_plan_without_repair(model_dir, tmp_path):
    src = model_dir("llama")
    lopper.prune(model=str(src), out=str(tmp_path / "off"), mlp=0.5, repair="none", **FAST)
    plan = Plan.load(tmp_path / "off" / "lopper_plan.json")
    del plan.meta["repair"]  # saved before --repair auto existed
    plan.save(tmp_path / "old.json")
    r = lopper.prune(model=str(src), out=str(tmp_path / "replay"), plan=str(tmp_path / "old.json"), **FAST)
    assert r["args"]["repair"] == "none"


def test_repair_auto_is_off_without_a_tokenizer_or_a_cut(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", tokenizer=False)
    r = lopper.prune(model=str(src), out=str(tmp_path / "out"), mlp=0.5, width_metric="magnitude", **FAST)
    assert r["args"]["repair"] == "none"
    r = lopper.prune(model=str(src), out=str(tmp_path / "same"), width_metric="magnitude", **FAST)
    assert r["args"]["repair"] == "none"


def test_unknown_repair_is_refused_by_the_api(model_dir, tmp_path):
    with pytest.raises(lopper.LopperError, match="--repair 'LSQ' is not one of auto, none, lsq"):
        lopper.prune(model=str(model_dir("llama")), out=str(tmp_path / "out"), mlp=0.5, repair="LSQ", **FAST)


def test_params_default_is_a_repaired_standard_checkpoint(model_dir, tmp_path):
    src = model_dir("llama", layers=6)
    r = lopper.prune(model=str(src), out=str(tmp_path / "out"), params=0.3, round_to=1, **FAST)
    assert r["standard_checkpoint"] is True
    assert r["plan"]["params"]["search"] == "kl"  # the depth/width mix is measured on this model
    dropped = r["structures"]["layers"]["before"] - r["structures"]["layers"]["after"]
    assert dropped == min(r["plan"]["params"]["candidates"], key=lambda c: c["kl"])["drop_layers"]
    saved = json.loads((tmp_path / "out" / "lopper_report.json").read_text())
    assert saved["args"]["repair"] == "lsq" and saved["plan"]["repair"] == "lsq"
    assert 0 < saved["phases_seconds"]["search"] <= saved["seconds"]  # the cost of the default (its candidates'
    # repairs), stated
