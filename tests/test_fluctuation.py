"""FLAP fluctuation importance (lopper.importance, metric "fluctuation") on a tiny Llama."""
from __future__ import annotations

import torch

import lopper
from lopper.arch import adapter_for
from lopper.importance import collect, width_scores
from tiny import tiny_model


def windows(n=3, length=24, vocab=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (1, length), generator=g) for _ in range(n)]


def _constant_inputs(module, channels: torch.Tensor, value: float):
    """A pre-hook that pins the given input channels of `module` to `value` on every token."""
    def hook(mod, args):
        x = args[0].clone()
        x[..., channels] = value
        return (x, *args[1:])
    return module.register_forward_pre_hook(hook)


def test_constant_channel_ranks_lowest_despite_large_weights():
    model = tiny_model("llama", layers=2, init=0.1, attn="eager")
    a = adapter_for(model)
    layer = a.layers()[1]
    down, o_proj, d = a.mlp_out(layer), a.attention(layer).o_proj, a.head_dim()
    head = torch.arange(2 * d, 3 * d)  # query head 2
    with torch.no_grad():  # MLP channel 5 and head 2 get 20x the weights of the others
        down.weight[:, 5] *= 20
        o_proj.weight[:, head] *= 20
    seen = []
    hooks = [_constant_inputs(down, torch.tensor([5]), 3.0), _constant_inputs(o_proj, head, -2.0),
             down.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, 24)))]
    try:
        stats = collect(model, a, windows(), quiet=True)
    finally:
        for h in hooks:
            h.remove()
    s = width_scores(a, stats, "fluctuation")
    assert s.mlp[1].argmin().item() == 5 and s.mlp[1][5] < 1e-6 * s.mlp[1].median()
    assert s.heads[1].argmin().item() == 2 and s.heads[1][2] < 1e-6 * s.heads[1].median()
    # the magnitude and activation criteria rank the same units highest: the weights alone would keep them
    for metric in ("magnitude", "activation"):
        other = width_scores(a, stats, metric)
        assert other.mlp[1].argmax().item() == 5 and other.heads[1].argmax().item() == 2
    # the score is the sample variance of each input times the squared weight column
    x = torch.cat(seen)
    want = x.var(0) * down.weight.detach().pow(2).sum(0)
    assert torch.allclose(s.mlp[1], want, rtol=1e-3, atol=1e-9)
    mean, _ = stats.input_mean_var(down)
    assert torch.allclose(mean, x.mean(0), atol=1e-5) and mean[5].item() == 3.0
    # a KV group sums its query heads; hidden channels fall back to the activation score
    assert torch.allclose(s.kv_heads[1], s.heads[1].view(2, -1).sum(1))
    assert torch.equal(s.hidden, width_scores(a, stats, "activation").hidden)


def test_fluctuation_through_the_api(model_dir, tmp_path):
    folder = model_dir("llama", layers=2)
    p = lopper.plan(model=str(folder), out=str(tmp_path / "plan.json"), mlp=0.5, heads=0.5,
                    width_metric="fluctuation", calib_samples=2, seq_len=32, quiet=True)
    assert len(p.per_layer[0]["mlp"]) == 12 and len(p.per_layer[0]["heads"]) == 2
