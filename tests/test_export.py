"""`lopper export --format nemotron-nas`: the folder, read back by a reader written here from the layout's published
rules alone (kv heads = num_attention_heads / n_heads_in_group, MLP width = roundup(int(2 m hidden / 3), 256),
no_op drops a part and its norm, Llama tensor names), computes what the pruned model computes."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lopper
from lopper.arch import adapter_class
from lopper.cli import main
from lopper.errors import LopperError
from lopper.export import export, ffn_mult, ffn_width, nemotron_nas, write_state
from lopper.surgery import apply, silenced

from plans import draw_plan
from tiny import outputs, tiny_model


class _NoAttention(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _NoMLP(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def read_nemotron_nas(folder: Path) -> transformers.LlamaForCausalLM:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    skip = ("block_configs", "auto_map", "architectures", "model_type", "hidden_size")
    valid = cfg["num_attention_heads"] * cfg["head_dim"]
    base = transformers.LlamaConfig.from_dict({**{k: v for k, v in cfg.items() if k not in skip}, "hidden_size": valid})
    base.hidden_size = cfg["hidden_size"]  # after init: LlamaConfig asks hidden % heads == 0, the layout does not
    base._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(base)
    for i, (layer, block) in enumerate(zip(model.model.layers, cfg["block_configs"])):
        attn, ffn = block["attention"], block["ffn"]  # the rules NVIDIA's block config classes assert
        assert (attn["n_heads_in_group"] is None) == attn["no_op"] and not attn["replace_with_linear"]
        assert (ffn["ffn_mult"] is None) == ffn["no_op"] and not ffn["replace_with_linear"]
        assert ffn["no_op"] or round(ffn["ffn_mult"], 6) == ffn["ffn_mult"]
        own = copy.deepcopy(base)
        if block["attention"]["no_op"]:
            layer.self_attn, layer.input_layernorm = _NoAttention(), nn.Identity()
        else:
            own.num_key_value_heads = cfg["num_attention_heads"] // block["attention"]["n_heads_in_group"]
            layer.self_attn = transformers.models.llama.modeling_llama.LlamaAttention(own, i)
        if block["ffn"]["no_op"]:
            layer.mlp, layer.post_attention_layernorm = _NoMLP(), nn.Identity()
        else:
            size = int(2 * block["ffn"]["ffn_mult"] * cfg["hidden_size"] / 3)
            own.intermediate_size = size + (-size) % 256
            layer.mlp = transformers.models.llama.modeling_llama.LlamaMLP(own)
    state = {}
    for f in folder.glob("*.safetensors"):
        state.update(load_file(f))
    if cfg.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)  # every tensor present, every shape the config's
    return model.eval()


def test_ffn_mult_round_trips_every_multiple_of_256():
    for hidden in (64, 384, 896, 4096, 8192):
        for width in range(256, 8 * hidden + 1, 256):
            assert ffn_width(ffn_mult(width, hidden), hidden) == width


def _cut(seed, data, bias=False, family="llama", **kw):
    model = tiny_model(family, seed=seed, attn="eager", init=0.2, **kw)
    if bias:  # Llama's optional biases (attention_bias, mlp_bias): padded rows get zero biases
        config = model.config
        config.attention_bias = config.mlp_bias = True
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0, 0.2) if name.endswith("bias") else None
    adapter = adapter_class(family)(model)
    plan = draw_plan(data, adapter, "all", hidden=data.draw(st.booleans(), label="hidden"))
    with silenced():
        apply(model, adapter, plan)
    return model, adapter


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**16), layers=st.integers(2, 4), kv=st.sampled_from([1, 2, 3]),
       group=st.integers(1, 3), mlp=st.integers(4, 300), tied=st.booleans(), bias=st.booleans(),
       family=st.sampled_from(["llama", "mistral", "qwen2"]))
def test_export_computes_what_the_cut_model_computes(tmp_path_factory, data, seed, layers, kv, group, mlp, tied, bias,
                                                     family):
    """Llama (with or without its optional biases), Mistral (window never binding), Qwen2 (q/k/v biases)."""
    model, adapter = _cut(seed, data, bias and family == "llama", family, layers=layers, heads=kv * group,
                          kv_heads=kv, mlp=mlp, tied=tied)
    ids = torch.randint(0, 96, (2, 12))
    expected = outputs(model, ids)
    config, state, blocks = nemotron_nas(model, adapter)
    folder = tmp_path_factory.mktemp("nas")
    write_state(state, folder)
    (folder / "config.json").write_text(json.dumps(config))
    got = outputs(read_nemotron_nas(folder), ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(b["mlp_written"] % 256 == 0 and b["mlp_written"] >= b["mlp"] for b in blocks)
    assert all(b["kv_heads_written"] >= b["kv_heads"] for b in blocks)
    if config["hidden_size"] == kv * group * 8:  # hidden not cut: hidden / heads is head_dim, as llama.cpp assumes
        assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]


def _empty(layer, attention: bool, mlp: bool) -> None:
    """Cut a layer's attention (all heads) and/or MLP (all channels) to nothing."""
    with torch.no_grad():
        if mlp:
            m = layer.mlp
            for lin in (m.gate_proj, m.up_proj):
                lin.weight.data = lin.weight.data[:0]
            m.down_proj.weight.data = m.down_proj.weight.data[:, :0]
        if attention:
            a = layer.self_attn
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                lin.weight.data = lin.weight.data[:0]
            a.o_proj.weight.data = a.o_proj.weight.data[:, :0]
            a.forward = lambda hidden_states, *args, **kw: (torch.zeros_like(hidden_states), None)


def test_empty_parts_and_sharded_files(tmp_path):
    """No attention -> attention no_op (n_heads_in_group null); no MLP beside an attention -> a zero MLP of 256
    channels (llama.cpp would skip the block's attention at a no_op MLP); neither -> both no_op, as llama.cpp's
    dummy blocks. Several shards get an index."""
    model = tiny_model("llama", seed=3, attn="eager", init=0.2, layers=4, mlp=40)
    adapter = adapter_class("llama")(model)
    layers = adapter.layers()
    _empty(layers[1], attention=False, mlp=True)
    _empty(layers[2], attention=True, mlp=False)
    _empty(layers[3], attention=True, mlp=True)
    ids = torch.randint(0, 96, (1, 10))
    expected = outputs(model, ids)
    config, state, blocks = nemotron_nas(model, adapter)
    b = config["block_configs"]
    assert not b[1]["ffn"]["no_op"] and ffn_width(b[1]["ffn"]["ffn_mult"], 32) == 256
    assert not state["model.layers.1.mlp.down_proj.weight"].any()
    assert b[2]["attention"] == {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    assert b[3]["attention"]["no_op"] and b[3]["ffn"] == {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
    assert not any(k.startswith(("model.layers.2.self_attn.", "model.layers.2.input_layernorm",
                                 "model.layers.3.")) for k in state)
    write_state(state, tmp_path, max_shard="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(outputs(read_nemotron_nas(tmp_path), ids), expected, atol=1e-5, rtol=1e-4)


def test_export_of_a_pruned_folder(model_dir, tmp_path):
    """prune with per-layer widths -> export: same logits as lopper.load() of the pruned folder, source untouched,
    an existing output kept without --force, and a clear refusal for other families."""
    src, pruned, out = model_dir("llama"), tmp_path / "pruned", tmp_path / "nas"
    lopper.prune(model=str(src), out=str(pruned), params=0.3, allocation="global", repair="lsq", calib_samples=4,
                 seq_len=32, quiet=True)
    before = {p.name: p.read_bytes() for p in pruned.iterdir() if p.is_file()}
    report = export(model=str(pruned), out=str(out), quiet=True)
    assert {p.name: p.read_bytes() for p in pruned.iterdir() if p.is_file()} == before
    ids = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(outputs(read_nemotron_nas(out), ids), outputs(lopper.load(str(pruned)), ids),
                               atol=1e-5, rtol=1e-4)
    assert report["params_after"] == report["params_before"] + report["padding_params"]
    assert (out / "tokenizer.json").is_file() and (out / "lopper_plan.json").is_file()
    assert main(["export", str(pruned), "--out", str(out), "--quiet"]) == 2  # exists: needs --force
    assert main(["export", str(pruned), "--out", str(out), "--quiet", "--force"]) == 0
    with pytest.raises(LopperError, match="qwen3"):  # q/k norms: not in the layout
        export(model=str(model_dir("qwen3")), out=str(tmp_path / "q"), quiet=True)
    assert not (tmp_path / "q").exists()


def test_a_binding_sliding_window_is_refused(model_copy, tmp_path):
    src = model_copy("mistral")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(LopperError, match="sliding window of 16"):
        export(model=str(src), out=str(tmp_path / "m"), quiet=True)
