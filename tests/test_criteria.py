"""Fisher / Taylor width importance (lopper.gradient) and SLEB layer removal (lopper.sleb) on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

import lopper
from lopper.arch import adapter_for
from lopper.errors import LopperError
from lopper.arch.base import out_dim
from lopper.gradient import _checkpointing, _embedding_loss, fisher_scores
from lopper.importance import width_scores
from lopper.plan import validate
from lopper.select import Target, choose
from tiny import tiny_model


def windows(n=3, length=24, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (1, length), generator=g) for _ in range(n)]


def test_fisher_scores_are_nonnegative_and_find_a_scaled_up_unit():
    model = tiny_model("llama", layers=2, init=0.1, attn="eager")
    a = adapter_for(model)
    layer = a.layers()[1]
    with torch.no_grad():  # MLP channel 5 and query head 2 of layer 1 made 6x louder
        for parts, unit in ((a.mlp_parts(layer), 5), (a.head_parts(layer), 2)):
            for p in parts:
                w, idx = p.module.weight, p.channels([unit])
                w.index_copy_(p.dim, idx, 6 * w.index_select(p.dim, idx))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = fisher_scores(model, a, windows(), quiet=True)
    for t in [*s.heads.values(), *s.mlp.values(), *s.kv_heads.values(), s.hidden]:
        assert (t >= 0).all() and torch.isfinite(t).all()
    assert s.mlp[1].argmax().item() == 5
    assert s.heads[1].argmax().item() == 2
    assert s.kv_heads[1].shape == (2,) and s.hidden.shape == (a.hidden_size(),)
    # the model is left as it was: same weights, no gradients, no grad-requiring state changed, eval mode
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training and not _checkpointing(model)
    plan = choose(a, Target(heads=0.5, mlp=0.5, hidden=0.25, round_to=1), None, s)
    validate(plan, a)
    assert 5 in plan.per_layer[1]["mlp"]


def test_fisher_through_the_api(model_dir, tmp_path):
    folder = model_dir("llama", layers=2)
    p = lopper.plan(model=str(folder), out=str(tmp_path / "plan.json"), mlp=0.5, heads=0.5, width_metric="fisher",
                    calib_samples=2, seq_len=32, quiet=True)
    assert len(p.per_layer[0]["mlp"]) == 12
    r = lopper.prune(model=str(folder), out=str(tmp_path / "out"), params=0.3, width_metric="fisher",
                     calib_samples=2, seq_len=32, quiet=True)
    assert r["params_non_embedding_after"] < r["params_non_embedding_before"]


def _scale_unit(a, parts, unit: int, factor: float) -> None:
    """Multiply every weight of one unit (and the biases of its output rows) by factor."""
    with torch.no_grad():
        for p in parts:
            idx = p.channels([unit])
            tensors = [(p.module.weight, p.dim)]
            if p.module.bias is not None and p.dim == out_dim(p.module):
                tensors.append((p.module.bias, 0))
            for t, dim in tensors:
                t.index_copy_(dim, idx, factor * t.index_select(dim, idx))


def test_encoder_fisher_is_the_squared_embedding_mask_gradient():
    model = tiny_model("bert", layers=2, init=0.1)
    a = adapter_for(model)
    _scale_unit(a, a.head_parts(a.layers()[1]), 1, 0.0)  # head 1 of layer 1 zeroed: no gradient reaches its mask
    ws = windows(n=1)
    s = fisher_scores(model, a, ws, quiet=True)
    assert s.heads[1][1].item() == 0.0 and (s.heads[1][[0, 2, 3]] > 0).all() and (s.mlp[0] > 0).all()
    assert not model.training and all(p.grad is None for p in model.parameters())

    def loss(factor: float) -> float:  # the same draw of eps as the first (only) window of fisher_scores
        trial = copy.deepcopy(model)
        t = adapter_for(trial)
        _scale_unit(t, t.mlp_parts(t.layers()[0]), 3, factor)
        with torch.no_grad():
            return _embedding_loss(trial, ws[0], torch.Generator().manual_seed(0)).item()

    h = 1e-2
    grad = (loss(1 + h) - loss(1 - h)) / (2 * h)
    assert abs(grad) > 1e-3
    assert s.mlp[0][3].item() == pytest.approx(grad ** 2, rel=0.03)


def test_sleb_removes_the_layer_whose_absence_hurts_least():
    from lopper.sleb import Sleb
    model = tiny_model("llama", layers=5, init=0.1, attn="eager")
    a = adapter_for(model)
    with torch.no_grad():  # layer 2 writes nothing into the residual stream: removing it changes nothing
        a.layers()[2].self_attn.o_proj.weight.zero_()
        a.layers()[2].mlp.down_proj.weight.zero_()
    ws = windows()
    sleb = Sleb(model, a, ws)
    full = sleb.loss([])
    assert sleb.loss([2]) == pytest.approx(full, abs=1e-5)
    assert sleb.loss([3]) != pytest.approx(full, abs=1e-4)
    assert sleb(1, 1, 4) == [2]
    two = sleb(2, 1, 4)
    assert 2 in two and len(two) == 2 and all(1 <= i < 4 for i in two)
    assert [i for i, _ in sleb.history[(1, 4)]][0] == 2  # greedy: the first removal stays
    # the model is left as it was (no instance forward left behind)
    assert all("forward" not in layer.__dict__ for layer in a.layers())
    # through the planner: protected edges kept, plan valid, the callable not in the plan's metadata
    plan = choose(a, Target(drop_layers=2, layer_metric="sleb", drop_fn=sleb), None,
                  width_scores(a, None, "magnitude"))
    validate(plan, a)
    assert sorted(set(range(5)) - set(plan.layers)) == two and "drop_fn" not in plan.meta["target"]


def test_sleb_through_the_api(model_dir, tmp_path):
    folder = model_dir("llama", layers=4)
    r = lopper.prune(model=str(folder), out=str(tmp_path / "out"), drop_layers=1, layer_metric="sleb",
                     calib_samples=2, seq_len=32, quiet=True)
    assert r["structures"]["layers"]["after"] == 3
    assert r["plan"]["target"]["layer_metric"] == "sleb"
    with pytest.raises(LopperError, match="unknown"):
        Target(drop_layers=1, layer_metric="nope").check(4)


def _edited_copy(model_copy, edit):
    """A tiny llama folder (with tokenizer) whose weights `edit(model, adapter)` changed."""
    import transformers
    folder = model_copy("llama", layers=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        edit(model, adapter_for(model))
    model.save_pretrained(folder)
    return folder


def test_sleb_through_the_api_drops_the_layer_that_writes_nothing(model_copy, tmp_path):
    """Layer 2 writes nothing into the residual stream, so its absence costs no loss: SLEB, run through plan(), must
    drop it and no other (block influence would drop it too; the distinction is tested on the metric above)."""
    def silence(model, a):
        a.layers()[2].self_attn.o_proj.weight.zero_()
        a.layers()[2].mlp.down_proj.weight.zero_()

    folder = _edited_copy(model_copy, silence)
    p = lopper.plan(model=str(folder), out=str(tmp_path / "plan.json"), drop_layers=1, layer_metric="sleb",
                    calib_samples=2, seq_len=32, quiet=True)
    assert p.layers == [0, 1, 3]


def test_fisher_through_the_api_keeps_the_unit_the_loss_depends_on(model_copy, tmp_path):
    """MLP channel 5 of layer 1 made 6x louder: the loss depends on it most, so Fisher, run through plan(), keeps it
    among the few channels left."""
    def louder(model, a):
        _scale_unit(a, a.mlp_parts(a.layers()[1]), 5, 6.0)

    folder = _edited_copy(model_copy, louder)
    p = lopper.plan(model=str(folder), out=str(tmp_path / "plan.json"), mlp=0.9, width_metric="fisher",
                    calib_samples=2, seq_len=32, round_to=1, quiet=True)
    assert 5 in p.per_layer[1]["mlp"] and len(p.per_layer[1]["mlp"]) <= 3
