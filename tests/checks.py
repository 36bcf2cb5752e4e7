"""The core invariant, shared by every family's property tests: a model cut to a plan computes what the original
computes with the same units masked; its shapes are the plan's; a standard config alone rebuilds it."""
from __future__ import annotations

import copy
import math

import torch

from lopper import surgery
from lopper.arch import adapter_for
from lopper.plan import Plan
from tiny import outputs

TOL = 1e-4  # float32, relative to the largest output (Gemma's scaled embeddings reach tens: summation order alone
# then moves the last bits by ~3e-4; a wrongly kept or dropped unit moves the outputs by O(1) of their scale)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cut_and_compare(model, plan: Plan, ids: torch.Tensor, visible: bool = True) -> tuple[bool, torch.Tensor]:
    """Cut `model` in place to `plan`; assert it equals a masked copy (< TOL) and, with `visible`, that the plan
    removed something the outputs show and parameters went down. Returns (standard checkpoint?, cut outputs)."""
    original = outputs(model, ids)
    masked = copy.deepcopy(model)
    surgery.mask(masked, adapter_for(masked), plan)
    expected = outputs(masked, ids)
    if visible:
        assert (expected - original).abs().max() > 1e-3, "the plan removes nothing that the outputs can see"
    before = n_params(model)
    standard = surgery.apply(model, adapter_for(model), plan)
    assert n_params(model) < before if visible else n_params(model) <= before
    got = outputs(model, ids)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert diff < TOL * scale, f"pruned differs from masked by {diff} (outputs up to {scale}) for plan {plan.to_json()}"
    return standard, got


def check_shapes(model, plan: Plan, tied: bool) -> None:
    adapter = adapter_for(model)
    assert len(adapter.layers()) == len(plan.layers)
    assert adapter.hidden_size() == len(plan.hidden)
    for layer, i in zip(adapter.layers(), plan.layers):
        assert adapter.layer_widths(layer) == {k: len(v) for k, v in plan.per_layer[i].items()}
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def rebuild_from_config(model):
    """What from_pretrained builds from the rewritten config alone, with these weights; norm epsilons and attention
    attributes must match the cut model's."""
    fresh = type(model)(copy.deepcopy(model.config)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    if getattr(model.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        for attr in ("variance_epsilon", "eps", "scaling", "num_heads", "split_size", "num_key_value_groups"):
            if hasattr(a, attr) and isinstance(getattr(a, attr), (int, float)):
                assert math.isclose(getattr(a, attr), getattr(b, attr), rel_tol=1e-9), f"{name}.{attr}"
    return fresh


def check_rebuilds_from_config(model, ids: torch.Tensor, expected: torch.Tensor) -> None:
    assert (outputs(rebuild_from_config(model), ids) - expected).abs().max().item() < 1e-5
