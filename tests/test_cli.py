"""The command line: `lopper plan` writes only a plan, `lopper prune --plan` replays it, `lopper eval --json` writes
its measurements."""
from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, fields

import pytest
import torch
import transformers

import lopper
from lopper import api
from lopper.cli import COMMANDS, build_parser, main
from lopper.options import convert, flag, resolve_args
from tiny import tree_digest

FAST = ["--calib-samples", "4", "--seq-len", "32", "--quiet"]
TEXT = ("Fellow citizens of the Senate and of the House of Representatives. Among the vicissitudes incident to life "
        "no event could have filled me with greater anxieties than that of which the notification was transmitted "
        "by your order, and received on the fourteenth day of the present month. ") * 3


@pytest.fixture
def src(model_dir):
    return model_dir("qwen2", layers=4, heads=4, kv_heads=2, head_dim=8, mlp=24, tied=True)


def test_plan_writes_only_a_plan_and_prune_replays_it(src, tmp_path, capsys):
    before = tree_digest(src)
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(src), "--out", str(plan_file), "--drop-layers", "1", "--mlp", "0.5", "--heads", "0.5",
                 *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no model folder, no temporary file
    assert tree_digest(src) == before
    plan = json.loads(plan_file.read_text())
    assert plan["format"] == "lopper-plan/1"
    assert len(plan["layers"]) == 3 and summary["layers_kept"] == 3
    assert {len(plan["per_layer"][str(i)]["mlp"]) for i in plan["layers"]} == {12}
    assert {len(plan["per_layer"][str(i)]["kv_heads"]) for i in plan["layers"]} == {1}

    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--plan", str(plan_file), "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "lopper_plan.json").read_text())
    for key in ("model", "layers", "hidden", "per_layer"):
        assert saved[key] == plan[key], key
    report = json.loads((out / "lopper_report.json").read_text())
    # the plan predicted the counts exactly
    assert report["params_after"] == summary["params"] == plan["meta"]["predicted"]["params"]
    assert report["params_non_embedding_after"] == summary["params_non_embedding"]
    assert report["structures"]["layers"] == {"before": 4, "after": 3}
    assert report["structures"]["mlp"] == {"before": 24, "after": 12}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_plan_then_prune_equals_prune_directly(src, tmp_path):
    # --repair-units plan: by default the repair of a direct prune re-chooses MLP channels, which a plan cannot know
    args = ["--drop-layers", "1", "--mlp", "0.25", "--hidden", "0.25", "--repair-units", "plan"]
    assert main(["plan", str(src), "--out", str(tmp_path / "plan.json"), *args, *FAST]) == 0
    assert main(["prune", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"),
                 *FAST]) == 0  # the same calibration text: the repair (on by default) refits on it
    assert main(["prune", str(src), "--out", str(tmp_path / "b"), *args, *FAST]) == 0
    a, b = (json.loads((tmp_path / d / "lopper_plan.json").read_text()) for d in "ab")
    assert (a["layers"], a["hidden"], a["per_layer"]) == (b["layers"], b["hidden"], b["per_layer"])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def manual_perplexity(folder, text: str, seq_len: int) -> tuple[float, int]:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    nll, count = 0.0, 0
    for w in range(len(ids) // seq_len):
        x = ids[w * seq_len:(w + 1) * seq_len][None]
        with torch.no_grad():
            logits = model(input_ids=x).logits
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return math.exp(nll / count), count


def test_eval_json_writes_perplexity_and_counts(src, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--out", str(out), "--mlp", "0.5", "--drop-layers", "1", *FAST]) == 0
    capsys.readouterr()
    results = {}
    for name, folder in (("before", src), ("after", out)):
        target = tmp_path / f"eval-{name}.json"
        assert main(["eval", str(folder), "--text", str(text), "--seq-len", "16", "--json", str(target),
                     "--quiet"]) == 0
        printed = json.loads(capsys.readouterr().out)
        r = json.loads(target.read_text())
        assert printed == r
        assert {"perplexity", "tokens", "seq_len", "params", "params_non_embedding"} <= r.keys()
        ppl, count = manual_perplexity(folder, TEXT, 16)
        assert r["seq_len"] == 16
        assert r["tokens"] == count and count % 15 == 0 and count >= 15 * 4
        assert r["perplexity"] == pytest.approx(ppl, rel=1e-4)
        model = lopper.load(str(folder))
        assert r["params"] == sum(p.numel() for p in model.parameters())
        emb = {id(p): p.numel() for p in (model.model.embed_tokens.weight, model.lm_head.weight)}
        assert r["params_non_embedding"] == r["params"] - sum(emb.values())
        results[name] = r
    report = json.loads((out / "lopper_report.json").read_text())
    assert results["before"]["params"] == report["params_before"]
    assert results["after"]["params"] == report["params_after"] < report["params_before"]
    assert results["after"]["perplexity"] != results["before"]["perplexity"]


def test_eval_without_text_reports_counts_only(src, tmp_path, capsys):
    assert main(["eval", str(src), "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert "perplexity" not in r and r["params"] > r["params_non_embedding"] > 0


def test_the_documented_commands_exist():
    assert {"plan": api.PlanArgs, "prune": api.PruneArgs, "eval": api.EvalArgs}.items() <= \
        {k: v[0] for k, v in COMMANDS.items()}.items()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_argument_field_is_a_flag(command):
    """The CLI is generated from the dataclasses: each field is a flag (or the positional), and the string a flag is
    given becomes the field's value, converted to its type, so `--x D` with the default D gives the default."""
    cls = COMMANDS[command][0]
    argv, expected = [command], {}
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.metadata.get("positional"):
            argv.append("MODEL")
            expected[f.name] = ["MODEL"] if isinstance(default, list) else "MODEL"
        elif isinstance(default, bool):
            argv.append(flag(f.name))
            expected[f.name] = True
        else:
            value = default or (["X"] if isinstance(default, list) else default)
            argv += [flag(f.name), *(value if isinstance(value, list) else [str(value)])]
            expected[f.name] = value
    ns = vars(build_parser().parse_args(argv))
    args = resolve_args(cls, None, {k: v for k, v in ns.items() if k != "command"})
    hints = typing.get_type_hints(cls)
    assert {f.name: convert(getattr(args, f.name), hints[f.name], f.name) for f in fields(cls)} == expected


def test_help_shows_the_option_groups(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "-h"])
    out = capsys.readouterr().out
    titles = [line.split(":")[0] for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:9] == ["options", "Model", "What to remove", "Speed target", "Scoring", "Repair", "Sparsity", "Memory",
                          "Run"]
