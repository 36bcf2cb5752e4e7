"""Bad input: a LopperError with a one-line message from the API, exit status 2 from the CLI, and nothing written
(no output folder or plan file, no temporary files, the input folder byte-identical)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

import lopper
from lopper.arch import SUPPORTED
from lopper.cli import main
from tiny import tree_digest

FAST = {"calib_samples": 4, "seq_len": 32, "quiet": True}


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir):
    """Inputs shared by the cases: a good model, a different one with its plan, a GPT-2 folder, text files."""
    root = tmp_path_factory.mktemp("errors")
    src = model_dir("llama", layers=4)
    other = model_dir("llama", layers=3, mlp=16)
    foreign = unsupported_model(root / "foreign")
    other_plan = root / "other_plan.json"
    lopper.plan(model=str(other), out=str(other_plan), mlp=0.5, **FAST)
    good_plan = root / "good_plan.json"
    lopper.plan(model=str(src), out=str(good_plan), mlp=0.5, **FAST)
    broken = {}
    for name, layer_edit in BROKEN_PLANS.items():
        plan = json.loads(good_plan.read_text())
        plan["per_layer"]["2"].update(layer_edit)
        broken[name] = root / f"{name}.json"
        broken[name].write_text(json.dumps(plan))
    short = root / "short.txt"
    short.write_text("We the people of the United States.\n")
    return {"src": src, "other": other, "foreign": foreign, "other_plan": other_plan, "good_plan": good_plan, **broken,
            "short": short, "missing": root / "no-such-file.txt"}


# edits of layer 2 of a good plan for the 4-layer tiny llama (4 query heads in 2 KV groups, mlp 24)
BROKEN_PLANS = {
    "empty_mlp": {"mlp": []},
    "unequal_groups": {"heads": [0, 1, 2], "kv_heads": [0, 1]},
    "orphan_head": {"heads": [0, 2], "kv_heads": [0]},
    "out_of_range": {"mlp": [0, 5, 24]},
    "unsorted": {"mlp": [5, 0, 7]},
}

# small causal LMs of families lopper may not support; the first one it does not support is the test case
FOREIGN = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=32, vocab_size=96, max_position_embeddings=32),
    "falcon": lambda: transformers.FalconConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                vocab_size=96),
    "opt": lambda: transformers.OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
                                          word_embed_proj_dim=16, vocab_size=96, max_position_embeddings=32),
}


def unsupported_model(folder: Path) -> Path:
    model_type = next(t for t in FOREIGN if t not in SUPPORTED)
    transformers.AutoModelForCausalLM.from_config(FOREIGN[model_type]()).save_pretrained(folder)
    (folder.parent / "foreign_type").write_text(model_type)
    return folder


def damaged(world, tmp_path, how: str) -> Path:
    folder = tmp_path / f"model-{how}"
    shutil.copytree(world["src"], folder)
    weights = folder / "model.safetensors"
    if how == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


# case -> (model, extra arguments, what the message must mention)
CASES = {
    "unsupported architecture": ("foreign", {"mlp": 0.5}, ["unsupported architecture", *SUPPORTED]),
    "mlp fraction above 1": ("src", {"mlp": 1.2}, ["--mlp 1.2", "0 <= F < 1"]),
    "negative heads fraction": ("src", {"heads": -0.1}, ["--heads -0.1"]),
    "hidden fraction of 1": ("src", {"hidden": 1.0}, ["--hidden 1.0"]),
    "plan for another model": ("src", {"plan": "other_plan"}, ["another model", "num_layers"]),
    "plan that empties a layer": ("src", {"plan": "empty_mlp"}, ["layer 2 mlp", "keep at least one"]),
    "plan with unequal heads per KV group": ("src", {"plan": "unequal_groups"}, ["layer 2", "unequal query heads"]),
    "plan keeping a head of a dropped KV group": ("src", {"plan": "orphan_head"}, ["layer 2", "query head 2",
                                                                                 "KV head 1"]),
    "plan with an index out of range": ("src", {"plan": "out_of_range"}, ["layer 2 mlp", "[0, 24)"]),
    "plan with unsorted indices": ("src", {"plan": "unsorted"}, ["layer 2 mlp", "sorted unique"]),
    "missing calibration file": ("src", {"mlp": 0.5, "calib": "missing"}, ["--calib", "no-such-file.txt"]),
    "too-short calibration file": ("src", {"mlp": 0.5, "calib": "short"}, ["--calib", "short.txt", "needs 128"]),
    "too many layers to drop": ("src", {"drop_layers": 3}, ["--drop-layers 3", "2 unprotected"]),
    "params with explicit widths": ("src", {"params": 0.3, "mlp": 0.5}, ["--params"]),
    "repair without damping": ("src", {"mlp": 0.5, "repair": "lsq", "repair_damp": 0.0}, ["--repair-damp 0.0"]),
    "repair correcting past the gap": ("src", {"mlp": 0.5, "repair": "lsq", "repair_correct": 1.5},
                                       ["--repair-correct 1.5", "0 <= A <= 1"]),
    "missing weights": ("missing", {"mlp": 0.5}, ["model-missing", "incomplete"]),
    "corrupt weights": ("corrupt", {"mlp": 0.5}, ["model-corrupt", "corrupt"]),
}


def resolve(world, tmp_path, name: str, extra: dict) -> tuple[Path, dict]:
    model = damaged(world, tmp_path, name) if name in ("missing", "corrupt") else world[name]
    extra = {k: str(world[v]) if isinstance(v, str) and v in world else v for k, v in extra.items()}
    return model, {**FAST, **extra}


def argv(command: str, model: Path, out: Path, kw: dict) -> list[str]:
    args = [command, str(model), "--out", str(out)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [] if v is False else [flag, str(v)]
    return args


def snapshot(*folders: Path) -> dict:
    return {str(f): tree_digest(f) if f.is_dir() else None for f in folders}


@pytest.mark.parametrize("command", ["prune", "plan"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_writes_nothing(case, command, world, tmp_path, capsys):
    name, extra, mentions = CASES[case]
    model, kw = resolve(world, tmp_path, name, extra)
    work = tmp_path / "work"
    work.mkdir()
    out = work / ("pruned" if command == "prune" else "plan.json")
    inputs = snapshot(model, world["src"], world["other"])
    plan_files = {p: p.read_bytes() for p in world.values() if p.suffix == ".json"}

    with pytest.raises(lopper.LopperError) as err:
        (lopper.prune if command == "prune" else lopper.plan)(model=str(model), out=str(out), **kw)
    message = str(err.value)
    assert "\n" not in message and message.strip() == message and len(message) < 400
    for m in mentions:
        assert m in message
    if name == "foreign":
        assert repr((model.parent / "foreign_type").read_text()) in message  # the model type it was given

    capsys.readouterr()
    assert main(argv(command, model, out, kw)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert f"lopper: error: {message}" in lines

    assert list(work.iterdir()) == []  # no output, no temporary sibling
    assert snapshot(model, world["src"], world["other"]) == inputs
    assert all(p.read_bytes() == b for p, b in plan_files.items())


@pytest.mark.parametrize("command", ["prune", "plan"])
def test_existing_output_needs_force(command, world, tmp_path, capsys):
    src = world["src"]
    out = tmp_path / ("pruned" if command == "prune" else "plan.json")
    if command == "prune":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = snapshot(tmp_path)
    args = argv(command, src, out, {"mlp": 0.5, **FAST})

    with pytest.raises(lopper.LopperError, match="already exists.*--force"):
        (lopper.prune if command == "prune" else lopper.plan)(model=str(src), out=str(out), mlp=0.5, **FAST)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert snapshot(tmp_path) == before

    assert main(args + ["--force"]) == 0
    if command == "prune":
        assert not (out / "keep.txt").exists()
        assert (out / "model.safetensors").is_file() and (out / "lopper_plan.json").is_file()
    else:
        assert json.loads(out.read_text())["format"] == "lopper-plan/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the old one is gone, no leftovers


def test_output_must_not_be_the_input(model_copy, capsys):
    src = model_copy("llama", layers=4)
    before = tree_digest(src)
    with pytest.raises(lopper.LopperError, match="is the input model"):
        lopper.prune(model=str(src), out=str(src), mlp=0.5, force=True, **FAST)
    assert main(argv("prune", src, src, {"mlp": 0.5, "force": True, **FAST})) == 2
    assert tree_digest(src) == before


def test_folder_without_config(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "README.md").write_text("hello")
    with pytest.raises(lopper.LopperError, match="no config.json"):
        lopper.prune(model=str(folder), out=str(tmp_path / "out"), mlp=0.5, **FAST)
    assert main(["eval", str(folder)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model"]


def test_not_a_plan_file(world, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"hello": 1}')
    with pytest.raises(lopper.LopperError, match="is not a lopper plan"):
        lopper.prune(model=str(world["src"]), plan=str(bogus), out=str(tmp_path / "out"), quiet=True)
    assert main(["prune", str(world["src"]), "--plan", str(tmp_path / "absent.json"), "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.json"]


def test_the_same_inputs_without_the_defect_work(world, tmp_path):
    """Guard for the cases above: each refusal is about its one defect, not about the shared inputs."""
    report = lopper.prune(model=str(world["src"]), plan=str(world["good_plan"]), out=str(tmp_path / "a"), quiet=True)
    assert report["structures"]["mlp"]["after"] < report["structures"]["mlp"]["before"]
    lopper.prune(model=str(world["other"]), plan=str(world["other_plan"]), out=str(tmp_path / "b"), quiet=True)
    lopper.plan(model=str(world["src"]), out=str(tmp_path / "c.json"), mlp=0.5, drop_layers=2, **FAST)


# every flag that names an input file or folder, per command: (flag or "MODEL" for the positional, extra flags)
PATH_FLAGS = {
    "plan": ["MODEL", "config", "calib", "plan"],
    "prune": ["MODEL", "config", "calib", "plan", "eval_text"],
    "eval": ["MODEL", "config", "text", "task_data"],
    "heal": ["MODEL", "config", "teacher", "text", "eval_text"],
    "bench": ["MODEL"],
    "export": ["MODEL", "template"],
    "report": ["MODEL", "eval", "bench"],
}
GOOD = {"plan": ["--mlp", "0.5"], "prune": ["--mlp", "0.5"], "eval": ["--tasks", "piqa"], "bench": [],
        "heal": ["--tokens", "64", "--seq-len", "16"], "export": ["--format", "gguf"], "report": []}


def path_flag_argv(command: str, flag: str, world, work: Path) -> list[str]:
    """The command with good inputs except `flag`, which names a file that does not exist."""
    missing = str(world["missing"])
    model = missing if flag == "MODEL" else str(world["src"])
    out = {"plan": ["--out", str(work / "plan.json")], "prune": ["--out", str(work / "out")],
           "heal": ["--out", str(work / "out"), "--teacher", str(world["src"]), "--text", str(world["short"])],
           "export": ["--out", str(work / "out.gguf")], "eval": ["--json", str(work / "e.json")],
           "bench": ["--json", str(work / "b.json")], "report": ["--out", str(work / "page.html")]}[command]
    good = [] if flag == "plan" else GOOD[command]  # a replayed plan takes no other selection
    argv = [command, model, *out, *good] + (["--quiet"] if command != "heal" else [])
    if flag != "MODEL":
        option = "--" + flag.replace("_", "-")
        if option in argv:
            argv[argv.index(option) + 1] = missing
        else:
            argv += [option, missing]
    return argv


def test_the_flags_walked_are_every_path_valued_flag():
    from dataclasses import fields

    from lopper.cli import COMMANDS
    pathlike = {"model", "models", "config", "calib", "plan", "eval_text", "text", "task_data", "teacher", "template",
                "eval", "bench"}
    for command, (cls, _, _) in COMMANDS.items():
        names = {f.name for f in fields(cls)} & pathlike
        assert {"MODEL" if n in ("model", "models") else n for n in names} == set(PATH_FLAGS[command]), command


@pytest.mark.parametrize("command,flag", [(c, f) for c, flags in PATH_FLAGS.items() for f in flags])
def test_a_missing_input_path_is_named_and_nothing_is_written(command, flag, world, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    inputs = snapshot(world["src"])
    assert main(path_flag_argv(command, flag, world, work)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lopper: error: ") and str(world["missing"]) in err
    if flag != "MODEL":
        assert "--" + flag.replace("_", "-") in err
    assert list(work.iterdir()) == []
    assert snapshot(world["src"]) == inputs
