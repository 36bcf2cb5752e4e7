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
activations of the backward, reduced with gradient checkpointing where the model supports it).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter, Part
from .arch.base import out_dim
from .errors import LopperError
from .importance import WidthScores


def _entries(adapter: Adapter) -> dict[nn.Parameter, list[tuple]]:
    """parameter -> [(key, Part, n_units)]; key = (structure, layer index or None). Bias entries of output-row
    Parts are included (masking a unit zeroes them too). Duplicates (tied weights) are listed once."""
    out: dict[nn.Parameter, list[tuple]] = defaultdict(list)
    seen: set = set()

    def add(key, parts: list[Part], n: int) -> None:
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

    for i, layer in enumerate(adapter.layers()):
        w = adapter.layer_widths(layer)
        add(("heads", i), adapter.head_parts(layer), w["heads"])
        add(("mlp", i), adapter.mlp_parts(layer), w["mlp"])
        if adapter.has_kv_groups:
            add(("kv", i), adapter.kv_parts(layer), w["kv_heads"])
        for name, parts in adapter.extra_parts(layer).items():
            add((name, i), parts, w[name])
    add(("hidden", None), adapter.hidden_parts(), adapter.hidden_size())
    return out


def fisher_scores(model: nn.Module, adapter: Adapter, windows: list[torch.Tensor], quiet: bool = False) -> WidthScores:
    """Fisher score per unit, sum over windows of (sum over the unit's weights of w * grad)^2; all >= 0."""
    if not adapter.is_encoder and adapter.lm_head() is None:
        raise LopperError("--width-metric fisher needs a causal LM loss, which this model has not: use "
                          "--width-metric activation or magnitude")
    if not windows:
        raise LopperError("--width-metric fisher needs calibration windows")
    entries = _entries(adapter)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    checkpointing = _checkpointing(model)
    totals = {e[0]: torch.zeros(e[2], dtype=torch.float64) for es in entries.values() for e in es}
    window: dict = {}

    def hook(p: torch.Tensor) -> None:
        with torch.no_grad():
            wg = p.detach().float() * p.grad.float()
            for key, part, n in entries[p]:
                s = part.per_unit(wg, n).cpu()
                window[key] = window.get(key, 0) + s
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
            ids = ids.to(device)
            if adapter.is_encoder:
                _embedding_loss(model, ids, noise).backward()
            else:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
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
    layers = range(len(adapter.layers()))
    totals = {k: v.float() for k, v in totals.items()}
    return WidthScores(heads={i: totals[("heads", i)] for i in layers}, mlp={i: totals.get(("mlp", i), torch.zeros(0)) for i in layers},
                       kv_heads={i: totals[("kv", i)] for i in layers} if adapter.has_kv_groups else {},
                       hidden=totals[("hidden", None)],
                       other={name: {i: totals[(name, i)] for i in layers if (name, i) in totals}
                              for name in {k[0] for k in totals} - {"heads", "mlp", "kv", "hidden"}})


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
