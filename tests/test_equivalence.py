"""Uniform plans (the same widths in every kept layer) give standard checkpoints where the config class allows it,
equal to the masked model. The random-architecture properties of every family are in test_families.py."""
from __future__ import annotations

import copy

import pytest
import torch

from lopper import surgery
from lopper.arch import adapter_for
from plans import uniform_plan
from checks import check_rebuilds_from_config
from tiny import FAMILIES, tiny_model

KINDS = ("layers", "heads", "kv", "mlp", "hidden", "all")
# hidden channels are not mask-equivalent under BERT's LayerNorm; BERT has no KV groups
BERT_KINDS = ("layers", "heads", "mlp", "all")
TOL = 1e-4
INIT = 0.2  # large random weights: any wrongly kept or dropped unit moves the outputs by O(1), not O(1e-2)


def forward(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


COVERAGE = [(f, t, k) for f in FAMILIES for t in ((False,) if f == "bert" else (False, True))
            for k in (BERT_KINDS if f == "bert" else KINDS)]
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
