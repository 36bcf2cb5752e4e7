"""An independent reference for every family's cut: the expected tensors are sliced by hand from the checkpoint's own
tensor names and the layout transformers documents for them (a query head is head_dim rows of q_proj and head_dim
columns of o_proj; gate/up rows and down columns per MLP channel; stacked experts [E, 2 x per, hidden] and
[E, hidden, per]), never through lopper's adapters. The masked-equivalence property tests read the adapters' Parts
for both the mask and the cut, so a wrong offset whose shapes fit passes them; it fails here (the mutation test at
the end shows it). Phi-3 and GPT-2, whose fused layouts need their own slicing, are checked in test_fused.py."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from families import REGISTRY
from lopper import surgery
from lopper.arch import adapter_for
from lopper.arch.base import Part
from lopper.plan import identity_plan
from plans import draw_plan
from test_families import cut_and_compare

# tensor name inside a layer -> (structure, dim, block): block "d" is head_dim, 1 one channel
RULES = {
    # Llama, Mistral, Qwen2/3, Gemma 2/3, the MoE families' attention and dense MLPs
    "self_attn.q_proj.weight": ("heads", 0, "d"), "self_attn.q_proj.bias": ("heads", 0, "d"),
    "self_attn.k_proj.weight": ("kv_heads", 0, "d"), "self_attn.k_proj.bias": ("kv_heads", 0, "d"),
    "self_attn.v_proj.weight": ("kv_heads", 0, "d"), "self_attn.v_proj.bias": ("kv_heads", 0, "d"),
    "self_attn.o_proj.weight": ("heads", 1, "d"),
    "mlp.gate_proj.weight": ("mlp", 0, 1), "mlp.up_proj.weight": ("mlp", 0, 1), "mlp.down_proj.weight": ("mlp", 1, 1),
    "mlp.shared_expert.gate_proj.weight": ("shared_mlp", 0, 1), "mlp.shared_expert.up_proj.weight": ("shared_mlp", 0, 1),
    "mlp.shared_expert.down_proj.weight": ("shared_mlp", 1, 1),
    "mlp.gate.weight": ("experts", 0, 1),  # the router: one row per expert
    # OPT
    "self_attn.out_proj.weight": ("heads", 1, "d"), "fc1.weight": ("mlp", 0, 1), "fc1.bias": ("mlp", 0, 1),
    "fc2.weight": ("mlp", 1, 1),
    # BERT / RoBERTa
    "attention.self.query.weight": ("heads", 0, "d"), "attention.self.query.bias": ("heads", 0, "d"),
    "attention.self.key.weight": ("heads", 0, "d"), "attention.self.key.bias": ("heads", 0, "d"),
    "attention.self.value.weight": ("heads", 0, "d"), "attention.self.value.bias": ("heads", 0, "d"),
    "attention.output.dense.weight": ("heads", 1, "d"), "intermediate.dense.weight": ("mlp", 0, 1),
    "intermediate.dense.bias": ("mlp", 0, 1), "output.dense.weight": ("mlp", 1, 1),
}
LAYER = re.compile(r"^(.*?\.(?:layers|layer)\.)(\d+)\.(.*)$")
FAMILIES = [n for n in REGISTRY if n not in ("phi3", "gpt2")]


def units(kept: list[int], block: int) -> torch.Tensor:
    return torch.tensor([u * block + j for u in kept for j in range(block)], dtype=torch.long)


def expected_tensor(name: str, t: torch.Tensor, entry: dict, d: int) -> torch.Tensor:
    """The tensor `name` of a kept layer whose plan entry is `entry`, sliced by the layout rules above."""
    if name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        per = t.shape[1] // 2 if name.endswith("gate_up_proj") else t.shape[2]
        rows = []
        for e in entry.get("experts", range(t.shape[0])):
            own = [u % per for u in entry.get("expert_mlp", range(t.shape[0] * per)) if u // per == e]
            own_t = torch.tensor(own, dtype=torch.long)
            rows.append(t[e][torch.cat([own_t, per + own_t])] if name.endswith("gate_up_proj") else t[e][:, own_t])
        return torch.stack(rows)
    rule = RULES.get(name)
    if rule is None:
        return t
    structure, dim, block = rule
    if structure == "kv_heads" and "kv_heads" not in entry:
        structure = "heads"
    if structure not in entry:
        return t
    return t.index_select(dim, units(entry[structure], d if block == "d" else 1))


def check_against_reference(family, arch: dict, plan_of) -> None:
    model = family.build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adapter_for(model)
    d = adapter.head_dim()
    plan = plan_of(adapter)
    surgery.apply(model, adapter, plan)
    new_index = {i: n for n, i in enumerate(plan.layers)}
    after = model.state_dict()
    seen = set()
    for key, t in before.items():
        m = LAYER.match(key)
        if m is None:
            assert torch.equal(after[key], t), key  # embeddings, final norm, head: no hidden channel cut here
            seen.add(key)
            continue
        prefix, i, name = m.group(1), int(m.group(2)), m.group(3)
        if i not in new_index:
            continue
        new_key = f"{prefix}{new_index[i]}.{name}"
        want = expected_tensor(name, t, plan.per_layer[i], d)
        assert after[new_key].shape == want.shape and torch.equal(after[new_key], want), new_key
        seen.add(new_key)
    assert seen == set(after), set(after) - seen  # nothing in the cut model that the reference did not predict


@pytest.mark.parametrize("name", FAMILIES)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_cut_equals_the_hand_sliced_checkpoint(name, data):
    family = REGISTRY[name]
    kind = "all" if not family.moe else data.draw(st.sampled_from(("layers", "heads", "experts", "expert_mlp", "mlp")))
    tied = data.draw(st.sampled_from(family.tie_options), label="tied")
    arch = data.draw(family.archs(name, kind, tied), label="arch")
    check_against_reference(family, arch, lambda adapter: family.plan(data, adapter, kind) if family.moe else
                            draw_plan(data, adapter, kind, hidden=False))


def test_a_wrong_head_offset_passes_the_masked_check_and_fails_the_reference(monkeypatch):
    """The mutation: query head u is taken to be head u + 1 (modulo the heads) in q_proj's rows and o_proj's columns,
    in both the mask and the cut: a consistent wrong offset. The masked-equivalence check cannot see it (the model
    it cuts computes what the model it masks computes); the reference must."""
    family = REGISTRY["llama"]
    arch = dict(family="llama", seed=3, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=16, tied=False)
    channels = Part.channels

    def shifted(self, kept):
        if getattr(self.module, "_lopper_probe", False) and self.block > 1:
            n = self.module.weight.shape[self.dim] // self.block
            kept = [(u + 1) % n for u in kept]
        return channels(self, kept)

    def plan_of(adapter):
        for layer in adapter.layers():
            layer.self_attn.q_proj._lopper_probe = layer.self_attn.o_proj._lopper_probe = True
        plan = identity_plan(adapter)
        plan.per_layer[0]["heads"] = [0, 2]  # one query head of each of the two KV groups
        return plan

    monkeypatch.setattr(Part, "channels", shifted)
    model = family.build(arch)
    ids = family.inputs(arch["seed"])
    cut_and_compare(model, plan_of(adapter_for(model)), ids)  # pruned == masked: both read the wrong columns
    with pytest.raises(AssertionError, match="q_proj"):
        check_against_reference(family, arch, plan_of)
