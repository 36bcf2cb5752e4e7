"""Surgery is exact: a physically pruned model computes what the original computes with the same units zeroed
(`lopper.surgery.mask`), for every family, tied and untied embeddings, and every structure; pruning nothing changes
nothing. Architectures and plans are drawn by hypothesis."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lopper import surgery
from lopper.arch import adapter_for
from lopper.evaluate import planned_params
from lopper.plan import identity_plan
from plans import draw_plan, uniform_plan
from checks import check_rebuilds_from_config, check_shapes, cut_and_compare, n_params
from tiny import DECODERS, FAMILIES, tiny_model

KINDS = ("layers", "heads", "kv", "mlp", "hidden", "all")
# hidden channels are not mask-equivalent under BERT's LayerNorm; BERT has no KV groups
BERT_KINDS = ("layers", "heads", "mlp", "all")
TOL = 1e-4
INIT = 0.2  # large random weights: any wrongly kept or dropped unit moves the outputs by O(1), not O(1e-2)
ATTN = "eager"  # SDPA with grouped KV heads costs ~7 ms a call on CPU; test_uniform_plans_* keeps the default (sdpa)

FAST = settings(max_examples=15, deadline=None)


def forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- strategies ----------------------------------------------------------------------------------------------------
@st.composite
def archs(draw, kind: str, family=None, tied=None) -> dict:
    """A random tiny architecture on which a plan of `kind` can remove something."""
    if family is None:
        family = draw(st.sampled_from(FAMILIES if kind in BERT_KINDS else DECODERS))
    if tied is None:
        tied = family != "bert" and draw(st.booleans())
    kv = draw(st.integers(2 if kind == "kv" else 1, 3))
    group = draw(st.integers(2 if kind == "heads" else 1, 3))
    kw = dict(layers=draw(st.integers(2, 4)), heads=kv * group, kv_heads=kv, head_dim=draw(st.sampled_from([4, 8])),
              mlp=draw(st.integers(8, 40)), tied=tied)
    if family == "bert":
        del kw["kv_heads"], kw["tied"]
    return {"family": family, "seed": draw(st.integers(0, 2**16)), **kw}


# ---- checks --------------------------------------------------------------------------------------------------------
def check_pruned_equals_masked(arch: dict, plan_of) -> None:
    model = tiny_model(init=INIT, attn=ATTN, **arch)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(arch["seed"]))
    plan = plan_of(adapter_for(model))
    predicted = planned_params(model, type(adapter_for(model)), plan)  # what `lopper plan` reports, on meta tensors
    standard, got = cut_and_compare(model, plan, ids)
    assert predicted["params"] == n_params(model)
    check_shapes(model, plan, arch.get("tied", False))  # the plan's shapes; tied embeddings stay tied
    if standard:
        check_rebuilds_from_config(model, ids, got)


# ---- tests ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@FAST
@given(data=st.data())
def test_pruned_equals_masked_random_architectures(kind, data):
    arch = data.draw(archs(kind), label="arch")
    check_pruned_equals_masked(arch, lambda adapter: draw_plan(data, adapter, kind))


COVERAGE = [(f, t, k) for f in FAMILIES for t in ((False,) if f == "bert" else (False, True))
            for k in (BERT_KINDS if f == "bert" else KINDS)]


@pytest.mark.parametrize("family,tied,kind", COVERAGE)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_pruned_equals_masked_every_family(family, tied, kind, data):
    arch = data.draw(archs(kind, family=family, tied=tied), label="arch")
    check_pruned_equals_masked(arch, lambda adapter: draw_plan(data, adapter, kind))


@FAST
@given(arch=archs("all"))
def test_identity_plan_changes_nothing(arch):
    model = tiny_model(init=INIT, attn=ATTN, **arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(arch["seed"]))
    before, config, state = forward(model, ids), model.config.to_dict(), copy.deepcopy(model.state_dict())
    params = n_params(model)
    assert surgery.apply(model, adapter_for(model), identity_plan(adapter_for(model))) is True
    assert torch.equal(forward(model, ids), before)
    assert n_params(model) == params
    changed = {k: v for k, v in model.config.to_dict().items() if config.get(k) != v}
    # Qwen2's max_window_layers is rewritten as "kept layers below it": clamped to the layer count, same meaning
    assert changed in ({}, {"max_window_layers": min(config.get("max_window_layers") or 0, arch["layers"])})
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# uniform plans (the same widths in every kept layer) must give standard checkpoints where the config class allows it
UNIFORM = {  # kind -> plan edits on the default tiny shape (3 layers, 4 heads in 2 KV groups, head_dim 8, mlp 24)
    "layers": {"layers": [0, 2]},
    "heads": {"heads": [1, 3]},  # one query head from each of the two groups
    "kv": {"heads": [2, 3], "kv_heads": [1]},
    "mlp": {"mlp": [0, 3, 4, 9, 10, 17, 20, 23]},
    "hidden": {"hidden": [i for i in range(32) if i % 8]},  # 28 channels: divisible by 4 heads (LlamaConfig's rule)
}
UNIFORM["all"] = {**UNIFORM["layers"], **UNIFORM["kv"], **UNIFORM["mlp"], **UNIFORM["hidden"]}


@pytest.mark.parametrize("family,tied,kind", COVERAGE)
def test_uniform_plans_give_standard_checkpoints(family, tied, kind):
    arch = {"family": family, "seed": 1, **({} if family == "bert" else {"tied": tied})}
    model = tiny_model(init=INIT, **arch)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    edits = dict(UNIFORM[kind])
    if family == "bert":
        edits.pop("hidden", None)
        edits.pop("kv_heads", None)
    plan = uniform_plan(adapter_for(model), edits)
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    standard = surgery.apply(model, adapter_for(model), plan)
    # BertSelfAttention derives the head size from hidden_size / heads: fewer heads cannot be a plain BertConfig
    assert standard is not (family == "bert" and "heads" in edits)
    got = forward(model, ids)
    assert (got - forward(masked, ids)).abs().max().item() < TOL
    if standard:
        check_rebuilds_from_config(model, ids, got)
        cfg = model.config
        assert cfg.num_hidden_layers == len(plan.layers)
        assert cfg.intermediate_size == len(plan.per_layer[plan.layers[0]]["mlp"])
        assert cfg.hidden_size == len(plan.hidden)
