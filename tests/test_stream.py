"""The layer-streamed prune (stream.py) gives the in-memory prune's result, holds at most two layers at a time, and
refuses by name what it does not stream."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import lopper
from lopper import layerwise, memory, stream
from lopper.errors import LopperError
from lopper.evaluate import STREAMED_WINDOWS
from lopper.gradient import fisher_scores
from families import REGISTRY
from tiny import make_model, tiny_model, tiny_moe, tiny_tokenizer, tree_digest

DENSE = [f for f in REGISTRY.values() if not f.moe]
# the cuts each family takes exactly (LayerNorm families: no hidden cut), with and without the repair
CUTS = {"core": dict(params=0.3), "layernorm": dict(drop_layers=1, heads=0.5, mlp=0.4, repair="lsq"),
        "hidden": dict(hidden=0.25, heads=0.5, mlp=0.5, drop_layers=1, repair="none")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def make(family: str, layers: int = 4):
        if (family, layers) not in cache:
            folder = tmp_path_factory.mktemp(family)
            if family in ("llama", "mistral", "qwen2", "qwen3", "bert", "roberta"):
                model = tiny_model(family, layers=layers, init=0.2)
            elif family in ("mixtral", "qwen2_moe", "qwen3_moe"):
                model = tiny_moe(family, layers=layers)
            else:
                model = make_model(family, layers=layers)
            model.save_pretrained(folder)
            tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
            cache[family, layers] = folder
        return cache[family, layers]
    return make


def both(src, tmp_path, **kw):
    """Prune `src` in memory and streamed with the same options; returns (report, folder) of each. A --params cut
    takes the rule in both (a streamed run cannot search: test_streamed_params_takes_the_rule)."""
    kw = {"params_search": "rule", **kw} if kw.get("params") else kw
    common = dict(model=str(src), calib="builtin", calib_samples=4, seq_len=32, quiet=True, **kw)
    out = []
    for mode in ("off", "on"):
        folder = tmp_path / mode
        out.append((lopper.prune(out=str(folder), stream=mode, **common), folder))
    return out


def outputs(folder, ids):
    y = lopper.load(str(folder))(input_ids=ids)
    return y.logits if hasattr(y, "logits") else y.last_hidden_state


def plan_of(folder):
    p = json.loads((folder / "lopper_plan.json").read_text())
    return {k: v for k, v in p.items() if k != "meta"}


@pytest.mark.parametrize("family", [f.name for f in DENSE])
def test_streamed_equals_in_memory(family, folders, tmp_path):
    fam = REGISTRY[family]
    cut = CUTS["layernorm"] if fam.layernorm else CUTS["core"]
    (mem, a), (streamed, b) = both(folders(family), tmp_path, **cut)
    assert streamed["memory"]["estimate"]["streamed"] and not mem["memory"]["estimate"]["streamed"]
    assert plan_of(a) == plan_of(b)
    assert streamed["params_after"] == mem["params_after"] < mem["params_before"]
    assert streamed["standard_checkpoint"] == mem["standard_checkpoint"]
    ids = fam.inputs(0)
    torch.testing.assert_close(outputs(b, ids), outputs(a, ids), atol=1e-5, rtol=0)
    if streamed["standard_checkpoint"] and not fam.encoder:  # the shards load in plain transformers
        plain = transformers.AutoModelForCausalLM.from_pretrained(b)
        torch.testing.assert_close(plain(input_ids=ids).logits, outputs(a, ids), atol=1e-5, rtol=0)


def test_streamed_params_takes_the_rule(folders, tmp_path, caplog):
    """The default search needs a copy of the model per candidate: streamed, the same command plans by the rule and
    says so, and gives what --params-search rule gives in memory."""
    common = dict(model=str(folders("llama")), calib="builtin", calib_samples=4, seq_len=32, params=0.3)
    with caplog.at_level("INFO", logger="lopper"):
        streamed = lopper.prune(out=str(tmp_path / "on"), stream="on", **common)
    assert any("a streamed run takes the rule" in r.getMessage() for r in caplog.records)
    rule = lopper.prune(out=str(tmp_path / "off"), stream="off", params_search="rule", quiet=True, **common)
    assert "search" not in streamed["plan"]["params"]
    assert plan_of(tmp_path / "on") == plan_of(tmp_path / "off")
    assert streamed["params_after"] == rule["params_after"]


@pytest.mark.parametrize("family,cut", [("llama", "hidden"), ("gemma2", "hidden"),
                                        ("qwen3", dict(params=0.4, width_metric="fluctuation")),
                                        ("llama", dict(params=0.3, allocation="global", layer_metric="angular")),
                                        ("mistral", dict(mlp=0.5, repair_units="plan", repair_correct=0.0))])
def test_streamed_equals_in_memory_options(family, cut, folders, tmp_path):
    (mem, a), (streamed, b) = both(folders(family), tmp_path, **(CUTS[cut] if isinstance(cut, str) else cut))
    assert plan_of(a) == plan_of(b)
    ids = REGISTRY[family].inputs(1)
    torch.testing.assert_close(outputs(b, ids), outputs(a, ids), atol=1e-5, rtol=0)


def test_at_most_two_layers_resident_and_source_untouched(folders, tmp_path, monkeypatch):
    src = folders("llama", layers=6)
    before = tree_digest(src)
    resident, peak = set(), [0]
    enter, leave = layerwise._enter, layerwise._leave

    def counting_enter(layer):
        enter(layer)
        if layerwise.is_streamed(layer) and layerwise._DEPTH.get(layer, 0):
            resident.add(layer)
            peak[0] = max(peak[0], len(resident))

    def counting_leave(layer):
        leave(layer)
        if not layerwise._DEPTH.get(layer, 0):
            resident.discard(layer)

    monkeypatch.setattr(layerwise, "_enter", counting_enter)
    monkeypatch.setattr(layerwise, "_leave", counting_leave)
    lopper.prune(model=str(src), out=str(tmp_path / "o"), stream="on", params=0.3, calib="builtin", calib_samples=2,
                 seq_len=16, quiet=True, sparsity=0.5, sparsity_criterion="sparsegpt")  # sparsity: a second pass
    assert 1 <= peak[0] <= 2
    assert tree_digest(src) == before


def test_auto_streams_when_the_model_does_not_fit(folders, tmp_path, monkeypatch):
    src = folders("llama")
    kw = dict(model=str(src), params=0.3, calib="builtin", calib_samples=2, seq_len=16, quiet=True)
    full = lopper.api.memory_estimate(lopper.api.PruneArgs(out="x", **kw), str(src),
                                      transformers.AutoConfig.from_pretrained(src))["peak_bytes"]
    monkeypatch.setattr(memory, "available", lambda device: full - 1)  # the in-memory estimate no longer fits
    report = lopper.prune(out=str(tmp_path / "o"), **kw)
    assert report["memory"]["estimate"]["streamed"]
    assert report["memory"]["estimate"]["peak_bytes"] < full
    with pytest.raises(LopperError, match="--stream on"):  # told how to fit instead of streaming
        lopper.prune(model=str(src), out=str(tmp_path / "p"), params=0.3, stream="off", quiet=True)
    with pytest.raises(LopperError, match=r"--stream on \(not with --layer-metric sleb"):
        lopper.prune(model=str(src), out=str(tmp_path / "p"), drop_layers=1, layer_metric="sleb", quiet=True)


SPARSE = {"wanda": dict(sparsity=0.5), "sparsegpt 2:4": dict(sparsity=0.5, sparsity_pattern="2:4",
                                                                sparsity_criterion="sparsegpt"),
          "magnitude": dict(sparsity=0.4, sparsity_criterion="magnitude", sparsity_scope="layer"),
          "owl": dict(sparsity=0.5, sparsity_allocation="owl", sparsity_ignore="down_proj|c_proj$")}


@pytest.mark.parametrize("family,sparse", [("llama", "wanda"), ("llama", "sparsegpt 2:4"), ("gpt2", "owl"),
                                           ("qwen3", "magnitude"), ("llama", "owl")])
def test_streamed_sparsity_equals_in_memory(family, sparse, folders, tmp_path):
    """The second pass over the written layers zeroes the same weights as the in-memory prune, reports the same
    counts and writes the same masks file; the cut is one with hidden channels and repair where the family has it."""
    cut = CUTS["layernorm"] if REGISTRY[family].layernorm else dict(params=0.3)
    (mem, a), (streamed, b) = both(folders(family), tmp_path, **cut, **SPARSE[sparse])
    assert plan_of(a) == plan_of(b)
    assert streamed["sparsity"] == mem["sparsity"] and mem["sparsity"]["zeroed"] > 0
    assert (a / "lopper_masks.npz").read_bytes() == (b / "lopper_masks.npz").read_bytes()
    ids = REGISTRY[family].inputs(2)
    torch.testing.assert_close(outputs(b, ids), outputs(a, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "bert", "opt"])
def test_streamed_fisher_equals_in_memory(family, folders):
    """Fisher scores with one layer in memory at a time (a hand-run backward, layer by layer) equal the whole
    model's backward, for every structure and the hidden channels (tied and untied heads, encoders)."""
    src = str(folders(family))
    windows = [REGISTRY[family].inputs(k) for k in range(3)]
    model, _, adapter = lopper.io.load_model(src)
    want = fisher_scores(model, adapter, windows, quiet=True)
    model, _, adapter = stream.load_streamed(src, "cpu", "auto")
    got = fisher_scores(model, adapter, windows, quiet=True)
    assert all(p.is_meta for layer in adapter.layers() for p in layer.parameters())  # released after
    for name in ("heads", "mlp", "kv_heads"):
        for i, w in getattr(want, name).items():
            torch.testing.assert_close(getattr(got, name)[i], w, rtol=1e-4, atol=1e-12 + 1e-6 * float(w.max()))
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-4, atol=1e-6 * float(want.hidden.max()))
    assert float(want.hidden.max()) > 0 and float(want.mlp[0].max()) > 0


def test_streamed_fisher_prune(folders, tmp_path):
    (mem, a), (streamed, b) = both(folders("qwen2"), tmp_path, params=0.3, width_metric="fisher")
    assert plan_of(a) == plan_of(b)
    ids = REGISTRY["qwen2"].inputs(1)
    torch.testing.assert_close(outputs(b, ids), outputs(a, ids), atol=1e-5, rtol=0)


def test_streamed_perplexity_equals_in_memory(folders, tmp_path):
    """--eval-text in a streamed prune, and lopper eval --stream on, measure what the in-memory runs measure (the
    layers run over several windows at once; one text window more than a chunk, so two chunks)."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more{i % 11}" for i in range(900)))
    src = folders("llama")
    n = 16 * (STREAMED_WINDOWS + 4)
    (mem, a), (streamed, b) = both(src, tmp_path, params=0.3, eval_text=str(text), eval_seq_len=16, eval_max_tokens=n)
    for key in ("perplexity_before", "perplexity_after"):
        assert streamed[key]["windows"] > STREAMED_WINDOWS
        assert streamed[key]["perplexity"] == pytest.approx(mem[key]["perplexity"], rel=1e-5)
    assert mem["perplexity_after"]["perplexity"] != mem["perplexity_before"]["perplexity"]
    for folder in (src, b):
        off = lopper.evaluate(model=str(folder), text=str(text), seq_len=16, max_tokens=n, stream="off", quiet=True)
        on = lopper.evaluate(model=str(folder), text=str(text), seq_len=16, max_tokens=n, stream="on", quiet=True)
        assert on["perplexity"] == pytest.approx(off["perplexity"], rel=1e-5) and on["params"] == off["params"]
    with pytest.raises(LopperError, match="--tasks runs the whole model"):
        lopper.evaluate(model=str(src), tasks="piqa", stream="on", quiet=True)


@pytest.mark.parametrize("option,named", [(dict(layer_metric="sleb"), "--layer-metric sleb"),
                                          (dict(params_search="loss"), "--params-search loss"),
                                          (dict(calib="self"), "--calib self"),
                                          (dict(sparsity=0.5, sparsity_scope="global"), "--sparsity-scope global"),
                                          ])
def test_refuses_what_does_not_stream(option, named, folders, tmp_path):
    with pytest.raises(LopperError, match=f"--stream on cannot stream {named}"):
        lopper.prune(model=str(folders("llama")), out=str(tmp_path / "o"), stream="on", params=0.3, quiet=True,
                     **option)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", [f.name for f in REGISTRY.values() if f.moe])
def test_converted_checkpoints_are_refused_by_name(family, folders, tmp_path):
    with pytest.raises(LopperError, match="uses a layout that transformers converts at load.*--stream off"):
        lopper.prune(model=str(folders(family)), out=str(tmp_path / "o"), stream="on", drop_layers=1,
                     calib="builtin", quiet=True)
    assert not (tmp_path / "o").exists()


def test_plan_streams_too(folders, tmp_path):
    src = folders("qwen2")
    common = dict(model=str(src), params=0.3, params_search="rule", calib="builtin", calib_samples=4, seq_len=32, quiet=True)
    a = lopper.plan(out=str(tmp_path / "a.json"), stream="off", **common)
    b = lopper.plan(out=str(tmp_path / "b.json"), stream="on", **common)
    assert (a.layers, a.per_layer, a.hidden) == (b.layers, b.per_layer, b.hidden)


def test_untied_embedding_and_head_are_read_only_while_used(folders):
    model, _, adapter = stream.load_streamed(str(folders("llama")), "cpu", "auto")
    assert model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta
    assert all(p.is_meta for layer in adapter.layers() for p in layer.parameters())
    assert not model.model.norm.weight.is_meta
    with layerwise.resident(model.lm_head):
        assert not model.lm_head.weight.is_meta
    assert model.lm_head.weight.is_meta
    tied, _, _ = stream.load_streamed(str(folders("gpt2")), "cpu", "auto")  # a tied head stays with its embedding
    assert not tied.transformer.wte.weight.is_meta and tied.lm_head.weight is tied.transformer.wte.weight
