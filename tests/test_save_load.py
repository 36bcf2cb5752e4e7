"""lopper.prune writes a folder that reloads to the pruned model: plain transformers for standard plans, lopper.load
for non-standard layouts; its report counts what was saved, its plan replays bit for bit, and generation with a KV
cache works after layers are removed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import lopper
from lopper import surgery
from lopper.arch import adapter_for
from lopper.plan import Plan, identity_plan
from tiny import DECODERS, tree_digest

CALIB = dict(calib_samples=4, seq_len=32, quiet=True, repair="none")  # equal to the masked original
SHAPE = dict(layers=4, heads=4, kv_heads=2, head_dim=8, mlp=24, init=0.2)  # 4 layers: 2 droppable
BERT_SHAPE = {k: v for k, v in SHAPE.items() if k != "kv_heads"}
# plans that give standard checkpoints (BERT: depth and MLP only, see src/lopper/arch/bert.py)
STANDARD = dict(drop_layers=1, heads=0.5, mlp=0.25, hidden=0.25)
BERT_STANDARD = dict(drop_layers=1, mlp=0.5)
CASES = [(f, t) for f in DECODERS for t in (False, True)] + [("bert", False)]


def shape(family: str, tied: bool = False) -> dict:
    return dict(BERT_SHAPE) if family == "bert" else dict(SHAPE, tied=tied)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def ids_for(folder: Path) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("We the people of the United States, in order to form a more perfect union", return_tensors="pt")
    assert ids.input_ids.shape[1] >= 8
    return ids.input_ids


def run(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor output (logits, or BERT's last_hidden_state and pooler_output)."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def pruned_in_memory(src: Path, plan: Plan):
    """The source model cut to `plan` without any save/load round trip."""
    model = lopper.load(str(src))
    surgery.apply(model, adapter_for(model), plan)
    return model.eval()


def auto_class(family: str):
    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


def read_report(out: Path) -> dict:
    return json.loads((out / "lopper_report.json").read_text())


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def check_generation(model, ids: torch.Tensor) -> None:
    """generate() with its KV cache picks the same tokens as recomputing everything at each step."""
    model.generation_config.eos_token_id = None  # never stop early: compare all 5 new tokens
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert cached.shape[1] == ids.shape[1] + 5
    assert torch.equal(cached, greedy_without_cache(model, ids, 5))


# ---- standard plans: plain transformers reloads them ---------------------------------------------------------------
@pytest.fixture(scope="module")
def standard_outputs(model_dir, tmp_path_factory):
    """family, tied -> (source folder, pruned folder): pruned once per module."""
    cache = {}

    def get(family: str, tied: bool):
        if (family, tied) not in cache:
            src = model_dir(family, **shape(family, tied))
            out = tmp_path_factory.mktemp("pruned") / f"{family}-{tied}"
            lopper.prune(model=str(src), out=str(out), **(BERT_STANDARD if family == "bert" else STANDARD), **CALIB)
            cache[family, tied] = src, out
        return cache[family, tied]

    return get


@pytest.mark.parametrize("family,tied", CASES)
def test_standard_plan_reloads_with_plain_transformers(family, tied, standard_outputs):
    src, out = standard_outputs(family, tied)
    report = read_report(out)
    assert report["standard_checkpoint"] is True
    assert report["structures"]["layers"] == {"before": 4, "after": 3}
    assert report["structures"]["mlp"]["after"] < report["structures"]["mlp"]["before"]
    if family != "bert":
        assert report["structures"]["kv_heads"] == {"before": 2, "after": 1}
        assert report["structures"]["hidden"]["after"] < report["structures"]["hidden"]["before"]

    reloaded = auto_class(family).from_pretrained(out).eval()
    assert not getattr(reloaded.config, "lopper_layout", None)
    plan = Plan.load(out / "lopper_plan.json")
    ids = ids_for(out)  # the tokenizer was copied next to the weights
    expected = run(pruned_in_memory(src, plan), ids)
    assert max_diff(run(reloaded, ids), expected) < 1e-5
    assert report["params_after"] == n_params(reloaded)
    assert report["params_before"] == n_params(lopper.load(str(src)))
    if tied:
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


@pytest.mark.parametrize("family,tied", CASES)
def test_saved_plan_replays_to_identical_weights(family, tied, standard_outputs, tmp_path):
    src, out = standard_outputs(family, tied)
    other = tmp_path / "replayed"
    report = lopper.prune(model=str(src), plan=str(out / "lopper_plan.json"), out=str(other), quiet=True)
    first, second = load_file(out / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert report["params_after"] == read_report(out)["params_after"]
    assert json.loads((other / "config.json").read_text()) == json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("tied", [False, True])
def test_generation_with_kv_cache_after_dropping_layers(family, tied, standard_outputs):
    src, out = standard_outputs(family, tied)
    ids = ids_for(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    check_generation(reloaded, ids)
    # the in-memory pruned model too: its attention modules were renumbered (layer_idx), not rebuilt
    in_memory = pruned_in_memory(src, Plan.load(out / "lopper_plan.json"))
    check_generation(in_memory, ids)


# ---- non-standard layouts: lopper.load rebuilds them from the saved plan -------------------------------------------
def nonuniform_plan(src: Path) -> Plan:
    """Per-layer widths that differ (no standard config can describe them), plus a dropped layer and hidden cut."""
    model = lopper.load(str(src))
    plan = identity_plan(adapter_for(model))
    plan.layers = [0, 1, 3]
    plan.per_layer[0].update(mlp=list(range(0, 24, 2)))
    plan.per_layer[1].update(heads=[2, 3], kv_heads=[1], mlp=[1, 5, 7, 11, 20])
    plan.per_layer[3].update(heads=[0, 3], kv_heads=[0, 1])
    plan.hidden = [i for i in range(32) if i % 4 != 1]  # 24 of 32
    return plan


@pytest.mark.parametrize("family", DECODERS)
def test_nonuniform_plan_reloads_with_lopper_load(family, model_dir, tmp_path):
    src = model_dir(family, **shape(family, tied=family == "qwen3"))
    plan_file = tmp_path / "plan.json"
    nonuniform_plan(src).save(plan_file)
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), plan=str(plan_file), out=str(out), quiet=True)
    assert report["standard_checkpoint"] is False
    assert report["structures"]["mlp"]["after"] == [12, 5, 24]

    reloaded = lopper.load(str(out))
    ids = ids_for(out)
    expected = run(pruned_in_memory(src, Plan.load(plan_file)), ids)
    assert max_diff(run(reloaded, ids), expected) < 1e-5
    assert report["params_after"] == n_params(reloaded)
    widths = [adapter_for(reloaded).layer_widths(l) for l in adapter_for(reloaded).layers()]
    assert widths == [{"heads": 4, "kv_heads": 2, "mlp": 12}, {"heads": 2, "kv_heads": 1, "mlp": 5},
                      {"heads": 2, "kv_heads": 2, "mlp": 24}]
    check_generation(reloaded, ids)


def test_bert_heads_reload_with_lopper_load(model_dir, tmp_path):
    src = model_dir("bert", **shape("bert"))
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), out=str(out), heads=0.5, mlp=0.25, drop_layers=1, **CALIB)
    assert report["standard_checkpoint"] is False
    assert report["structures"]["heads"] == {"before": 4, "after": 2}

    reloaded = lopper.load(str(out))
    ids = ids_for(out)
    in_memory = pruned_in_memory(src, Plan.load(out / "lopper_plan.json"))
    assert max_diff(run(reloaded, ids), run(in_memory, ids)) < 1e-5
    assert report["params_after"] == n_params(reloaded)
    # and the cut BERT still computes what the original computes with those heads and channels zeroed
    masked = lopper.load(str(src))
    surgery.mask(masked, adapter_for(masked), Plan.load(out / "lopper_plan.json"))
    assert max_diff(run(reloaded, ids), run(masked, ids)) < 1e-4


def test_bert_hidden_reloads_with_lopper_load(model_dir, tmp_path):
    """Hidden pruning of BERT is not mask-equivalent, but what is saved is still what was computed in memory."""
    src = model_dir("bert", **shape("bert"))
    out = tmp_path / "out"
    report = lopper.prune(model=str(src), out=str(out), hidden=0.25, **CALIB)
    assert report["structures"]["hidden"] == {"before": 32, "after": 24}
    reloaded = lopper.load(str(out))
    ids = ids_for(out)
    expected = run(pruned_in_memory(src, Plan.load(out / "lopper_plan.json")), ids)
    assert max_diff(run(reloaded, ids), expected) < 1e-5
    assert report["params_after"] == n_params(reloaded)


def test_prune_leaves_the_source_untouched_and_copies_the_tokenizer(model_dir, tmp_path):
    src = model_dir("llama", **shape("llama", True))
    before = tree_digest(src)
    out = tmp_path / "out"
    lopper.prune(model=str(src), out=str(out), **STANDARD, **CALIB)
    assert tree_digest(src) == before
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "lopper_plan.json",
                                              "lopper_report.json", "tokenizer.json", "tokenizer_config.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left beside it


def test_the_report_is_final_when_the_folder_appears_and_every_file_has_one_mode(model_dir, tmp_path, monkeypatch):
    """The report is written once, inside the staged folder: what is renamed into place already holds the size on
    disk and the phase times (a reader never sees a report rewritten after the rename)."""
    import os

    from lopper import io
    src = model_dir("llama", **shape("llama", True))
    out = tmp_path / "out"
    seen = {}
    rename = os.rename

    def watch(a, b):
        if Path(b) == out:
            seen.update(json.loads((Path(a) / "lopper_report.json").read_text()))
        rename(a, b)

    monkeypatch.setattr(io.os, "rename", watch)
    report = lopper.prune(model=str(src), out=str(out), **STANDARD, **CALIB)
    assert seen == json.loads((out / "lopper_report.json").read_text()) == json.loads(json.dumps(report))
    assert seen["size_bytes_after"] == (out / "model.safetensors").stat().st_size
    assert "cut_save_evaluate" in seen["phases_seconds"]
    assert len({p.stat().st_mode & 0o777 for p in out.iterdir()}) == 1
