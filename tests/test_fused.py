"""Fused projections checked without lopper's own bookkeeping: the masked-equivalence tests read the adapter's Parts
through `surgery.removed_cuts` for both the mask and the cut, so a wrong offset whose shapes still fit would pass
them. Here the expected weights are sliced by hand from the fused layout the model documents (Phi-3
`qkv_proj = [q | k | v]`, `gate_up_proj = [gate | up]`; GPT-2 `c_attn` outputs `[q | k | v]`), and Phi-3 must also
compute what a Llama built from its split weights computes, before and after the same cut."""
from __future__ import annotations

import copy

import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from lopper import surgery
from lopper.arch import adapter_for
from plans import draw_plan
from tiny import make_model

SEQ, VOCAB = 9, 96


def head_rows(heads: list[int], d: int) -> torch.Tensor:
    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)


def split_llama(phi3) -> transformers.LlamaForCausalLM:
    """The Llama that computes what `phi3` computes: q/k/v and gate/up split out of the fused weights."""
    c = phi3.config
    cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                                   num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                                   head_dim=c.hidden_size // c.num_attention_heads, rms_norm_eps=c.rms_norm_eps,
                                   rope_theta=c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None)
                                   else c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                                   tie_word_embeddings=c.tie_word_embeddings, hidden_act=c.hidden_act)
    cfg._attn_implementation = "eager"
    llama = transformers.LlamaForCausalLM(cfg).eval()
    d = cfg.head_dim
    q_n, kv_n = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    with torch.no_grad():
        llama.model.embed_tokens.weight.copy_(phi3.model.embed_tokens.weight)
        llama.model.norm.weight.copy_(phi3.model.norm.weight)
        llama.lm_head.weight.copy_(phi3.lm_head.weight)
        for a, b in zip(llama.model.layers, phi3.model.layers):
            qkv = b.self_attn.qkv_proj.weight
            a.self_attn.q_proj.weight.copy_(qkv[:q_n])
            a.self_attn.k_proj.weight.copy_(qkv[q_n:q_n + kv_n])
            a.self_attn.v_proj.weight.copy_(qkv[q_n + kv_n:])
            a.self_attn.o_proj.weight.copy_(b.self_attn.o_proj.weight)
            gate, up = b.mlp.gate_up_proj.weight.chunk(2)
            a.mlp.gate_proj.weight.copy_(gate)
            a.mlp.up_proj.weight.copy_(up)
            a.mlp.down_proj.weight.copy_(b.mlp.down_proj.weight)
            a.input_layernorm.weight.copy_(b.input_layernorm.weight)
            a.post_attention_layernorm.weight.copy_(b.post_attention_layernorm.weight)
    return llama


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_phi3_cut_equals_the_split_llama_cut_and_the_hand_sliced_weights(data):
    kv = data.draw(st.integers(1, 3), label="kv heads")
    group = data.draw(st.integers(1, 3), label="group")
    arch = dict(seed=data.draw(st.integers(0, 2**16), label="seed"), layers=data.draw(st.integers(2, 3)),
                heads=kv * group, kv_heads=kv, head_dim=8, mlp=data.draw(st.integers(8, 24)), tied=False)
    phi3 = make_model("phi3", **arch)
    llama = split_llama(phi3)
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(arch["seed"]))
    assert (logits(phi3, ids) - logits(llama, ids)).abs().max().item() < 1e-4  # the split is right
    plan = draw_plan(data, adapter_for(phi3), "all", hidden=False)
    fused = {i: (phi3.model.layers[i].self_attn.qkv_proj.weight.clone(),
                 phi3.model.layers[i].mlp.gate_up_proj.weight.clone()) for i in plan.layers}
    surgery.apply(phi3, adapter_for(phi3), plan)
    same = copy.deepcopy(plan)
    same.model["model_type"] = "llama"  # the same kept indices, for the split twin
    surgery.apply(llama, adapter_for(llama), same)
    assert (logits(phi3, ids) - logits(llama, ids)).abs().max().item() < 1e-4
    d, n_q, n_kv, inter = 8, arch["heads"] * 8, kv * 8, arch["mlp"]
    for new, i in enumerate(plan.layers):
        e = plan.per_layer[i]
        qkv, gate_up = fused[i]
        want_qkv = torch.cat([qkv[head_rows(e["heads"], d)], qkv[n_q + head_rows(e["kv_heads"], d)],
                              qkv[n_q + n_kv + head_rows(e["kv_heads"], d)]])
        keep = torch.tensor(e["mlp"], dtype=torch.long)
        want_gate_up = torch.cat([gate_up[keep], gate_up[inter + keep]])
        layer = phi3.model.layers[new]
        assert torch.equal(layer.self_attn.qkv_proj.weight, want_qkv)
        assert torch.equal(layer.mlp.gate_up_proj.weight, want_gate_up)


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_gpt2_cut_c_attn_equals_the_hand_sliced_q_k_v(data):
    heads = data.draw(st.integers(2, 4), label="heads")
    arch = dict(seed=data.draw(st.integers(0, 2**16), label="seed"), layers=2, heads=heads, kv_heads=heads,
                head_dim=8, mlp=16)
    gpt2 = make_model("gpt2", **arch)
    plan = draw_plan(data, adapter_for(gpt2), "heads")
    before = {i: (gpt2.transformer.h[i].attn.c_attn.weight.clone(), gpt2.transformer.h[i].attn.c_attn.bias.clone(),
                  gpt2.transformer.h[i].attn.c_proj.weight.clone()) for i in plan.layers}
    surgery.apply(gpt2, adapter_for(gpt2), plan)
    width = heads * 8
    for new, i in enumerate(plan.layers):
        cols = head_rows(plan.per_layer[i]["heads"], 8)
        idx = torch.cat([cols, width + cols, 2 * width + cols])  # Conv1D: [in, out], outputs along dim 1
        w, b, proj = before[i]
        attn = gpt2.transformer.h[new].attn
        assert torch.equal(attn.c_attn.weight, w[:, idx]) and torch.equal(attn.c_attn.bias, b[idx])
        assert torch.equal(attn.c_proj.weight, proj[cols])  # c_proj reads the kept heads' outputs: its input rows
