"""Cut a model to a plan: slice weights, drop layers, rewrite the config, renumber layer_idx. The one place that
changes weights and config; `mask` zeroes the same units instead, which is what the tests compare against."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .arch import Adapter, Part
from .arch.base import ExpertTensor, out_dim
from .plan import Plan, validate

log = logging.getLogger("lopper")


@contextmanager
def silenced():
    """Mute surgery's `old -> new` log while trying candidate plans on copies."""
    level = log.level
    log.setLevel(logging.ERROR)  # setLevel, not the attribute: the logger caches what it has let through
    try:
        yield
    finally:
        log.setLevel(level)


@contextmanager
def recorded():
    """Hold surgery's `old -> new` lines back instead of logging them (a trial cut that may become the cut): yields
    the list of their log records, which `log.handle` emits later, once."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    saved = log.handlers, log.propagate
    log.handlers, log.propagate = [handler], False
    try:
        yield records
    finally:
        log.handlers, log.propagate = saved


def removed_cuts(adapter: Adapter, plan: Plan) -> dict[tuple[nn.Module, int], torch.Tensor]:
    """(module, dim) -> channel indices to remove, merged over every structure that touches that module."""
    cuts: dict[tuple[nn.Module, int], list[torch.Tensor]] = defaultdict(list)
    sig = plan.model

    def add(parts: list[Part], keep: list[int], n: int) -> None:
        gone = sorted(set(range(n)) - set(keep))
        if gone:
            for p in parts:
                cuts[(p.module, p.dim)].append(p.channels(gone))

    layers = adapter.layers()
    for i in plan.layers:
        layer, entry = layers[i], plan.per_layer[i]
        add(adapter.head_parts(layer), entry["heads"], sig["heads"][i])
        add(adapter.mlp_parts(layer), entry["mlp"], sig["mlp"][i])
        if adapter.has_kv_groups:
            add(adapter.kv_parts(layer), entry["kv_heads"], sig["kv_heads"][i])
        for key, parts in adapter.extra_parts(layer).items():
            add(parts, _expert_channels(entry, sig, i) if key == "expert_mlp" else entry[key], sig[key][i])
    kept = set(plan.layers)
    dropped = {id(m) for i, layer in enumerate(layers) if i not in kept for m in layer.modules()}
    hidden = [p for p in adapter.hidden_parts()
              if id(p.module.module if isinstance(p.module, ExpertTensor) else p.module) not in dropped]
    add(hidden, plan.hidden, sig["hidden"])
    return {k: torch.cat(v).unique() for k, v in cuts.items()}


def _expert_channels(entry: dict, sig: dict, i: int) -> list[int]:
    """The expert channels to keep in the cut: the plan's, plus as many of each removed expert as a kept one keeps,
    so that every expert has the same count when the channel cut (which comes first) stacks them back."""
    n, per = sig["experts"][i], sig["expert_mlp"][i] // max(sig["experts"][i], 1)
    count = len(entry["expert_mlp"]) // max(len(entry["experts"]), 1)
    gone = sorted(set(range(n)) - set(entry["experts"]))
    return sorted(entry["expert_mlp"] + [e * per + j for e in gone for j in range(count)])


def mask(model: nn.Module, adapter: Adapter, plan: Plan) -> list:
    """Zero, in place, every unit the plan removes; dropped layers pass their input through (a forward hook), and
    structures that zeros cannot silence (experts: the router) get the adapter's hooks. Returns the hook handles.
    The pruned model must compute what this masked model computes."""
    validate(plan, adapter)
    zero(removed_cuts(adapter, plan))
    kept = set(plan.layers)
    handles = [layer.register_forward_hook(_passthrough, with_kwargs=True)
               for i, layer in enumerate(adapter.layers()) if i not in kept]
    for i in plan.layers:
        layer = adapter.layers()[i]
        removed = {k: sorted(set(range(plan.model[k][i])) - set(plan.per_layer[i][k]))
                   for k in adapter.extra_parts(layer)}
        handles += adapter.mask_hooks(layer, removed)
    return handles


@torch.no_grad()
def zero(cuts: dict[tuple[nn.Module, int], torch.Tensor]) -> None:
    """Zero the given channels (and the matching bias entries of output rows)."""
    for (module, dim), gone in cuts.items():
        if _flat(module, dim):
            w = module.weight.movedim(dim, 1)  # a view: [E, channels, ...]
            gone = gone.to(w.device)
            w[gone // w.shape[1], gone % w.shape[1]] = 0.0
            continue
        module.weight.index_fill_(dim, gone.to(module.weight.device), 0.0)
        if dim == out_dim(module) and getattr(module, "bias", None) is not None:
            module.bias.index_fill_(0, gone.to(module.bias.device), 0.0)


def _passthrough(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x


def apply(model: nn.Module, adapter: Adapter, plan: Plan) -> bool:
    """Cut `model` to `plan` in place. Returns True if the result is a standard checkpoint for its config class
    (uniform widths the class accepts); otherwise the config keeps the original widths and only `lopper.load()`
    can rebuild the model from the saved plan."""
    validate(plan, adapter)
    hidden_before = adapter.hidden_size()
    cuts = removed_cuts(adapter, plan)
    with torch.no_grad():
        _drop_layers(adapter, plan.layers)
        cut_modules(cuts)
        if adapter.rms_norm and len(plan.hidden) != hidden_before:
            _rescale_rms_norms(adapter, hidden_before / len(plan.hidden))
        if len(plan.hidden) != hidden_before:
            adapter.after_hidden_cut(hidden_before / len(plan.hidden))
    for j, layer in enumerate(adapter.layers()):
        adapter.set_layer_attrs(layer, j)
    standard = _rewrite_config(adapter, plan, hidden_before)
    adapter.finish(standard)
    return standard


def cut_modules(cuts: dict[tuple[nn.Module, int], torch.Tensor]) -> None:
    """Slice every (module, dim) in `cuts` to the channels kept; experts' own channels first, since their flat
    indices count in the original experts. Tied weights are cut once."""
    memo: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    with torch.no_grad():
        for (module, dim), gone in sorted(cuts.items(), key=lambda kv: not _flat(*kv[0])):
            _slice(module, dim, gone, memo)


@torch.no_grad()
def cut_layer(adapter: Adapter, layer: nn.Module, cuts: dict, hidden_ratio: float) -> None:
    """Cut one kept layer's tensors in place as `apply` cuts them (the layer-streamed prune writes each layer this
    way while the rest of the model stays on the meta device, where `apply` then cuts only shapes).
    hidden_ratio = d / d' rescales the layer's RMSNorm weights; their eps is `apply`'s to change."""
    inside = {id(m) for m in layer.modules()}
    cut_modules({k: v for k, v in cuts.items()
                 if id(k[0].module if isinstance(k[0], ExpertTensor) else k[0]) in inside})
    if adapter.rms_norm and hidden_ratio != 1:
        for n in adapter.layer_norms(layer):
            adapter.scale_norm(n, math.sqrt(hidden_ratio))


def _drop_layers(adapter: Adapter, keep: list[int]) -> None:
    layers = adapter.layers()
    if len(keep) != len(layers):
        log.info("layers: %d -> %d (dropped %s)", len(layers), len(keep),
                 sorted(set(range(len(layers))) - set(keep)))
        adapter.set_layers([layers[i] for i in keep])


def _slice(module: nn.Module, dim: int, gone: torch.Tensor, memo: dict) -> None:
    """Keep the complement of `gone` along `dim` of module.weight (and of the bias, for output rows and norms).
    Tied parameters are cut once and re-shared through `memo`, which holds (old, new) so that no id is reused."""
    w = module.weight
    key = (id(w), dim)
    if key not in memo and _flat(module, dim):
        memo[key] = (w, nn.Parameter(_slice_experts(w, dim, gone), requires_grad=w.requires_grad))
    elif key not in memo:
        keep = _complement(gone, w.shape[dim]).to(w.device)
        memo[key] = (w, nn.Parameter(w.index_select(dim, keep).contiguous(), requires_grad=w.requires_grad))
        bias = getattr(module, "bias", None)
        if dim == out_dim(module) and bias is not None:
            module.bias = nn.Parameter(bias.index_select(0, keep).contiguous(), requires_grad=bias.requires_grad)
    module.weight = memo[key][1]
    _resize_attrs(module)


def _flat(module, dim: int) -> bool:
    return isinstance(module, ExpertTensor) and dim == module.flat_dim


def _slice_experts(w: torch.Tensor, dim: int, gone: torch.Tensor) -> torch.Tensor:
    """Keep, in each expert e of w [E, ...], the channels along `dim` whose flat index e * n + c is not in `gone`;
    every expert keeps the same count. A gather with sizes known up front, so it also runs on the meta device."""
    n_exp, n = w.shape[0], w.shape[dim]
    keep = torch.ones(n_exp * n, dtype=torch.bool)
    keep[gone.cpu()] = False
    idx = keep.view(n_exp, n).nonzero()[:, 1].view(n_exp, -1).to(w.device)  # [E, kept], equal counts (validated)
    v = w.movedim(dim, 1)
    return v[torch.arange(n_exp, device=w.device)[:, None], idx].movedim(1, dim).contiguous()


def _complement(gone: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[gone] = False
    return keep.nonzero().flatten()


def _resize_attrs(module: nn.Module) -> None:
    shape = module.weight.shape
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = shape[1]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (shape[0],)
    elif isinstance(module, Conv1D):  # GPT-2: weight [in, out], forward() reshapes to nf outputs
        module.nx, module.nf = shape


def _rescale_rms_norms(adapter: Adapter, ratio: float) -> None:
    """RMSNorm over d' kept channels equals RMSNorm over all d channels with the removed ones zeroed if the weight is
    scaled by sqrt(d/d') and eps by d/d' (the eps change goes into the config). Minitron skips this; it matters once
    the removed channels carry little energy, which is what the importance scores select for."""
    norms = [n for layer in adapter.layers() for n in adapter.layer_norms(layer)] + adapter.final_norms()
    for n in norms:
        adapter.scale_norm(n, math.sqrt(ratio))
        if hasattr(n, "variance_epsilon"):
            n.variance_epsilon *= ratio
        elif hasattr(n, "eps"):
            n.eps *= ratio


def _rewrite_config(adapter: Adapter, plan: Plan, hidden_before: int) -> bool:
    config, widths = adapter.config, plan.uniform_widths()
    standard = widths is not None
    if standard:
        updates = adapter.config_updates(widths, plan.layers, hidden_before)
        problem = adapter.check_config(updates)
        standard = problem is None
        if problem:
            log.warning("the pruned widths are not a standard %s (%s): the checkpoint needs lopper.load()",
                        type(config).__name__, problem)
    if not standard:
        config.lopper_layout = "plan"  # config keeps the original widths; lopper.load() replays the plan
        return False
    for k, v in updates.items():
        old = getattr(config, k, None)
        if old != v:
            log.info("config.%s: %s -> %s", k, _brief(old), _brief(v))
            setattr(config, k, v)
    return True


def _brief(v) -> str:
    s = str(v)
    return s if len(s) < 80 else s[:77] + "..."
