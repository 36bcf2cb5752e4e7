"""First-order Taylor / Fisher width importance (Kwon et al. 2022; LLM-Pruner, Ma et al. 2023).

Put a mask m_u = 1 on every unit u (a query head, a KV group, an MLP channel, a hidden channel). The gradient of the
causal LM loss with respect to m_u is the sum over the unit's weights of w * dL/dw (every Part of the unit, signed),
and the unit's Fisher score is the sum over calibration windows of that mask gradient squared (the diagonal of the
empirical Fisher of the masks; its half is the second-order estimate of the loss increase from removing the unit).

Encoders have no LM loss and sentence-embedding models no labels: there the loss is label-free, the model's output
read as the mean of a Gaussian, e ~ N(f(x), I), with f(x) the L2-normalised mean-pooled last hidden state [1, hidden].
A gradient of -log p(e | x) at a sampled e is J^T eps with eps ~ N(0, I), so E[(mask gradient)^2] = ||df/dm_u||^2: the
true (not empirical) Fisher of the masks, how far the sentence embedding moves per unit of mask (in place of the task
loss Kwon et al. use on BERT). One draw of eps per window, seeded, so a unit's score is that squared distance times a
chi-square(1) noise per window: use many short windows.

Memory: one backward per window; each weight's per-unit sums are taken in a post-accumulate-grad hook the moment its
gradient is complete, and the gradient is freed there, so at most one weight's gradient exists at a time (plus the
activations of the backward, reduced with gradient checkpointing where the model supports it). A streamed model
(stream.py) runs the same backward one layer at a time: the layers' inputs [1, L, hidden] are kept, and each layer
is read again in reverse order and its forward recomputed with gradients (`_streamed_totals`).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter
from .arch.base import out_dim
from .errors import LopperError
from .importance import WidthScores
from .layerwise import call_layer, capture_layer_inputs, embed, is_streamed, layers_skipped, outside_resident, resident


def _groups(adapter: Adapter, layer: nn.Module | None, i: int | None) -> list[tuple]:
    """[(key, Parts, n_units)] of one layer's structures (key = (structure, layer index)), or of the hidden
    channels (key = ("hidden", None)) when `layer` is None."""
    if layer is None:
        return [(("hidden", None), adapter.hidden_parts(), adapter.hidden_size())]
    w = adapter.layer_widths(layer)
    out = [(("heads", i), adapter.head_parts(layer), w["heads"]), (("mlp", i), adapter.mlp_parts(layer), w["mlp"])]
    if adapter.has_kv_groups:
        out.append((("kv", i), adapter.kv_parts(layer), w["kv_heads"]))
    out += [((name, i), parts, w[name]) for name, parts in adapter.extra_parts(layer).items()]
    return out


def _entries(groups: list[tuple]) -> dict[nn.Parameter, list[tuple]]:
    """parameter -> [(key, Part, n_units)] for `groups` (_groups). Bias entries of output-row Parts are included
    (masking a unit zeroes them too). Duplicates (tied weights) are listed once."""
    out: dict[nn.Parameter, list[tuple]] = defaultdict(list)
    seen: set = set()
    for key, parts, n in groups:
        for p in parts:
            tensors = [(p.module.weight, p)]
            bias = getattr(p.module, "bias", None)
            if isinstance(bias, nn.Parameter) and p.dim == out_dim(p.module) and not isinstance(p.module, nn.Embedding):
                tensors.append((bias, p))  # 1-D: Part.per_unit reads it channel by channel
            for t, part in tensors:
                ident = (id(t), key, part.dim, part.offset, part.block, part.per_expert)
                if ident not in seen:
                    seen.add(ident)
                    out[t].append((key, part, n))
    return out


def _all_groups(adapter: Adapter) -> list[tuple]:
    return [g for i, layer in enumerate(adapter.layers()) for g in _groups(adapter, layer, i)] + \
        _groups(adapter, None, None)


def _add_unit_grads(window: dict, entries: list[tuple], p: torch.Tensor, grad: torch.Tensor) -> None:
    """window[key] += the per-unit sums of w * dL/dw of parameter p, for each (key, Part, n) of p's entries."""
    wg = p.detach().float() * grad.float()
    for key, part, n in entries:
        window[key] = window.get(key, 0) + part.per_unit(wg, n).cpu()


def fisher_scores(model: nn.Module, adapter: Adapter, windows: list[torch.Tensor], quiet: bool = False) -> WidthScores:
    """Fisher score per unit, sum over windows of (sum over the unit's weights of w * grad)^2; all >= 0."""
    if not adapter.is_encoder and adapter.lm_head() is None:
        raise LopperError("--width-metric fisher needs a causal LM loss, which this model has not: use "
                          "--width-metric activation or magnitude")
    if not windows:
        raise LopperError("--width-metric fisher needs calibration windows")
    totals = {key: torch.zeros(n, dtype=torch.float64) for key, _, n in _all_groups(adapter)}
    streamed = any(is_streamed(layer) for layer in adapter.layers())
    (_streamed_totals if streamed else _resident_totals)(model, adapter, windows, totals, quiet)
    layers = range(len(adapter.layers()))
    totals = {k: v.float() for k, v in totals.items()}
    return WidthScores(heads={i: totals[("heads", i)] for i in layers}, mlp={i: totals.get(("mlp", i), torch.zeros(0)) for i in layers},
                       kv_heads={i: totals[("kv", i)] for i in layers} if adapter.has_kv_groups else {},
                       hidden=totals[("hidden", None)],
                       other={name: {i: totals[(name, i)] for i in layers if (name, i) in totals}
                              for name in {k[0] for k in totals} - {"heads", "mlp", "kv", "hidden"}})


def _resident_totals(model: nn.Module, adapter: Adapter, windows, totals: dict, quiet: bool) -> None:
    """One backward of the whole model per window; each weight's per-unit sums are taken in a post-accumulate-grad
    hook the moment its gradient is complete, and the gradient is freed there."""
    entries = _entries(_all_groups(adapter))
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    checkpointing = _checkpointing(model)
    window: dict = {}

    def hook(p: torch.Tensor) -> None:
        with torch.no_grad():
            _add_unit_grads(window, entries[p], p, p.grad)
        p.grad = None  # nothing is kept: the next window starts from an empty gradient

    hooks = []
    try:
        for p in params:
            p.requires_grad_(p in entries)
        hooks = [p.register_post_accumulate_grad_hook(hook) for p in entries]
        # not for encoders: BERT attention applies its dropout whenever the model is in training mode
        if getattr(model, "supports_gradient_checkpointing", False) and not checkpointing and not adapter.is_encoder:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers checkpoints only in training mode; decoders here have no active dropout
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.eval()
        device = next(model.parameters()).device
        noise = torch.Generator().manual_seed(0)
        for ids in tqdm(windows, desc="fisher", disable=quiet, leave=False):
            window.clear()
            _loss(model, adapter, ids.to(device), noise).backward()
            _add_window(adapter, window, totals)
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        if _checkpointing(model) and not checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.train(was_training)


def _loss(model: nn.Module, adapter: Adapter, ids: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    if adapter.is_encoder:
        return _embedding_loss(model, ids, noise)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _streamed_totals(model: nn.Module, adapter: Adapter, windows, totals: dict, quiet: bool) -> None:
    """The same gradients with one layer in memory at a time (layerwise.py), by hand-run activation checkpointing:
    per window, the layers run forward keeping only their inputs [1, L, hidden] each; the loss's gradient with
    respect to the last hidden states then goes back one layer at a time (each read again, its forward recomputed
    with gradients), and last into the embedding. w * dL/dw is linear in the gradient, so the tail's and the
    embedding's shares of a tied weight add up per unit before the square."""
    layers = list(adapter.layers())
    noise = torch.Generator().manual_seed(0)
    for ids in tqdm(windows, desc="fisher (streamed)", disable=quiet, leave=False):
        window: dict = {}
        ids = ids.to(next(p.device for p in model.parameters() if not p.is_meta))
        (x0,), (calls,) = capture_layer_inputs(model, adapter, [ids])
        xs = [x0]
        with torch.no_grad():
            for i, layer in enumerate(layers):
                xs.append(call_layer(layer, xs[-1], calls[i]))
        leaf = xs.pop().detach().requires_grad_()
        with torch.enable_grad(), layers_skipped(model, adapter, leaf), _scored(adapter, None, layers) as scored:
            g = _backward(window, scored, _loss(model, adapter, ids, noise), leaf, None)
        for i in reversed(range(len(layers))):
            with torch.enable_grad(), resident(layers[i]), _scored(adapter, i, layers) as scored:
                x = xs.pop().detach().requires_grad_()
                g = _backward(window, scored, call_layer(layers[i], x, calls[i]), x, g)
        with torch.enable_grad(), outside_resident(model, adapter), _scored(adapter, None, layers) as scored:
            x0 = embed(model, adapter, ids)
            if x0.requires_grad:
                _backward(window, scored, x0, None, g)
        _add_window(adapter, window, totals)


@contextmanager
def _scored(adapter: Adapter, i: int | None, layers):
    """{parameter: entries} of the scored parameters now in memory in layer i, or outside the layers when i is
    None, with gradients turned on for the block."""
    if i is None:
        inside = {id(p) for layer in layers for p in layer.parameters()}
        own = {id(p) for p in adapter.model.parameters() if id(p) not in inside and not p.is_meta}
        groups = _groups(adapter, None, None)
    else:
        own = {id(p) for p in layers[i].parameters()}
        groups = _groups(adapter, layers[i], i) + _groups(adapter, None, None)
    entries = {p: e for p, e in _entries(groups).items() if id(p) in own}
    flags = {p: p.requires_grad for p in entries}
    for p in entries:
        p.requires_grad_(True)
    try:
        yield entries
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)


def _backward(window: dict, entries: dict, out: torch.Tensor, x: torch.Tensor | None,
              g: torch.Tensor | None) -> torch.Tensor | None:
    """Gradients of `out` (grad_outputs g) with respect to the parameters of `entries` (_scored) and the input
    `x`; adds the parameters' per-unit sums to `window` and returns x's gradient."""
    params = list(entries)
    inputs = ([x] if x is not None else []) + params
    grads = torch.autograd.grad(out, inputs, grad_outputs=g, allow_unused=True)
    with torch.no_grad():
        for p, grad in zip(params, grads[len(inputs) - len(params):]):
            if grad is not None:
                _add_unit_grads(window, entries[p], p, grad)
    return grads[0] if x is not None else None


def _embedding_loss(model: nn.Module, ids: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """eps . f(x) with eps ~ N(0, I): its gradient is a draw of the Gaussian-output score J^T eps (module docstring)."""
    pooled = model(input_ids=ids).last_hidden_state.float().mean(1)  # [1, hidden]
    emb = nn.functional.normalize(pooled, dim=-1)
    eps = torch.randn(emb.shape, generator=noise).to(emb.device)
    return (emb * eps).sum()


def _checkpointing(model: nn.Module) -> bool:
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def _add_window(adapter: Adapter, window: dict, totals: dict) -> None:
    """Square this window's signed mask gradients into the totals; a KV group's mask also gates its query heads,
    so its gradient is its own plus theirs (summed before squaring)."""
    signed = dict(window)
    if adapter.has_kv_groups:
        for key in [k for k in totals if k[0] == "kv"]:
            own = window.get(key, torch.zeros(totals[key].shape[0]))
            heads = window.get(("heads", key[1]), torch.zeros(0))
            signed[key] = own + heads.view(own.shape[0], -1).sum(1) if heads.numel() else own
    for key, g in signed.items():
        totals[key] += g.double().pow(2)
