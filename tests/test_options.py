"""Arguments: the Python API is exactly as strict as the CLI (same refusals, same messages), the option groups
check themselves, and a recipe file (YAML or JSON, or a run's lopper_report.json) gives the same run as its flags."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lopper
from lopper import api
from lopper.cli import COMMANDS, main
from lopper.errors import LopperError

FAST = {"calib_samples": 4, "seq_len": 32, "quiet": True}

BAD = [  # (command, positional + flags, the same as keywords)
    ("prune", ["m", "--out", "o", "--repair", "LSQ"], dict(model="m", out="o", repair="LSQ")),
    ("prune", ["m", "--out", "o", "--calib-samples", "abc"], dict(model="m", out="o", calib_samples="abc")),
    ("prune", ["m", "--out", "o", "--params", "1.5"], dict(model="m", out="o", params=1.5)),
    ("prune", ["m", "--out", "o", "--plan", "p.json", "--experts", "0.5"],
     dict(model="m", out="o", plan="p.json", experts=0.5)),
    ("prune", ["m", "--out", "o", "--width-metric", "wanda"], dict(model="m", out="o", width_metric="wanda")),
    ("prune", ["m", "--out", "o", "--repair-damp", "0"], dict(model="m", out="o", repair_damp=0.0)),
    ("prune", ["m", "--out", "o", "--sparsity-pattern", "3:2"], dict(model="m", out="o", sparsity_pattern="3:2")),
    ("prune", ["m", "--out", "o", "--target-speedup", "0.5"], dict(model="m", out="o", target_speedup=0.5)),
    ("prune", ["m", "--out", "o", "--target-speedup", "1.5", "--params", "0.2"],
     dict(model="m", out="o", target_speedup=1.5, params=0.2)),
    ("prune", ["m", "--out", "o", "--dtype", "float8"], dict(model="m", out="o", dtype="float8")),
    ("prune", ["m"], dict(model="m")),
    ("plan", ["m", "--out", "p.json", "--allocation", "Global"], dict(model="m", out="p.json", allocation="Global")),
    ("plan", ["m", "--out", "p.json", "--protect-first", "-1"], dict(model="m", out="p.json", protect_first=-1)),
    ("eval", ["m", "--limit", "5"], dict(model="m", limit=5)),
    ("eval", ["m", "--seq-len", "x"], dict(model="m", seq_len="x")),
    ("heal", ["m", "--out", "o", "--text", "t.txt", "--teacher", "t", "--kd-weight", "2"],
     dict(model="m", out="o", text=["t.txt"], teacher="t", kd_weight=2.0)),
    ("heal", ["m", "--out", "o", "--text", "t.txt", "--kd-weight", "0", "--dtype", "fp16"],
     dict(model="m", out="o", text=["t.txt"], kd_weight=0.0, dtype="fp16")),
    ("bench", ["m", "--new-tokens", "1"], dict(models=["m"], new_tokens=1)),
    ("export", ["m", "--out", "o", "--format", "gguf"], dict(model="m", out="o", format="gguf")),
]


@pytest.mark.parametrize("command,argv,kwargs", BAD, ids=[" ".join(b[1][1:]) or b[0] for b in BAD])
def test_the_api_refuses_what_the_cli_refuses_with_the_same_message(command, argv, kwargs, capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written: each value is refused before any work
    assert main([command, *argv]) == 2
    cli_message = capsys.readouterr().err.strip().removeprefix("lopper: error: ")
    with pytest.raises(LopperError) as e:
        COMMANDS[command][1](**kwargs)
    assert str(e.value) == cli_message
    assert list(tmp_path.iterdir()) == []


def test_each_group_checks_itself():
    with pytest.raises(LopperError, match="--repair-correct 2.0 is out of range"):
        api.RepairOptions(repair_correct=2.0).check()
    with pytest.raises(LopperError, match="--sparsity-criterion 'owl' is not one of"):
        api.SparsityOptions(sparsity_criterion="owl").check()
    args = api.ScoringOptions(calib_samples="8")
    args.check()
    assert args.calib_samples == 8  # a recipe's or a flag's string becomes the field's type


@pytest.fixture
def src(model_dir):
    return model_dir("llama", layers=4, heads=4, kv_heads=2, head_dim=8, mlp=32)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_yaml_recipe_gives_the_run_of_its_flags_and_flags_override_it(src, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("params: 0.3\nrepair: none\ncalib-samples: 4\nseq_len: 32\nquiet: true\n")
    assert main(["prune", str(src), "--config", str(recipe), "--out", str(tmp_path / "a")]) == 0
    assert main(["prune", str(src), "--params", "0.3", "--repair", "none", "--calib-samples", "4", "--seq-len", "32",
                 "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert same_weights(tmp_path / "a", tmp_path / "b")
    report = json.loads((tmp_path / "a" / "lopper_report.json").read_text())
    assert report["args"]["params"] == 0.3 and report["args"]["repair"] == "none"
    assert main(["prune", str(src), "--config", str(recipe), "--params", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "lopper_report.json").read_text())["args"]["params"] == 0.5
    p = lopper.prune(model=str(src), config=str(recipe), out=str(tmp_path / "d"))  # the API reads it too
    assert p["args"]["params"] == 0.3 and same_weights(tmp_path / "a", tmp_path / "d")


def test_a_report_replays_its_run(src, tmp_path):
    first = lopper.prune(model=str(src), out=str(tmp_path / "a"), params=0.3, **FAST)
    assert first["args"]["repair"] == "lsq"
    assert main(["prune", "--config", str(tmp_path / "a" / "lopper_report.json"), "--out", str(tmp_path / "b")]) == 0
    assert same_weights(tmp_path / "a", tmp_path / "b")
    again = json.loads((tmp_path / "b" / "lopper_report.json").read_text())
    assert {k: v for k, v in again["args"].items() if k not in ("out", "config")} == \
        {k: v for k, v in first["args"].items() if k not in ("out", "config")}


def test_a_bad_recipe_is_refused_by_name(src, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"params": 0.3, "prams": 0.2}))
    with pytest.raises(LopperError, match="unknown option\\(s\\) prams"):
        lopper.prune(model=str(src), config=str(recipe), out=str(tmp_path / "o"))
    recipe.write_text("params: [")
    recipe.rename(tmp_path / "r.yaml")
    with pytest.raises(LopperError, match="is not valid YAML"):
        lopper.prune(model=str(src), config=str(tmp_path / "r.yaml"), out=str(tmp_path / "o"))
    with pytest.raises(LopperError, match="cannot be read"):
        lopper.prune(model=str(src), config=str(tmp_path / "missing.yaml"), out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_healed_models_report_replays_the_heal_not_the_prune(tmp_path):
    from lopper.heal import HealArgs
    from lopper.options import resolve_args
    report = tmp_path / "lopper_report.json"
    report.write_text(json.dumps({"lopper_version": "0", "args": {"model": "original", "params": 0.25},
                                  "heal": {"args": {"model": "pruned", "teacher": "original", "lr": 3e-4}}}))
    args = resolve_args(HealArgs, None, {"config": str(report), "out": "healed"})
    assert (args.model, args.teacher, args.lr, args.out) == ("pruned", "original", 3e-4, "healed")
    prune_args = resolve_args(api.PruneArgs, None, {"config": str(report)})
    assert (prune_args.model, prune_args.params) == ("original", 0.25)
