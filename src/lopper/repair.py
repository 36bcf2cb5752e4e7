"""Closed-form repair after cutting: least-squares refit of every kept layer's output projections.

For a writer W [out, in] (o_proj, down_proj, or BERT's output denses) whose input columns `kept` survive, fed
calibration inputs X [T, in] from the already-cut model, the refit is

    W' = argmin ||X_kept W'^T - Y||^2 + lambda ||W'||^2,   Y = X W^T + alpha E,

solved as W' = (H[kept, kept] + lambda I)^-1 (H[kept] W^T + alpha X_kept^T E)^T with H = X^T X and
lambda = damp x mean(diag H[kept, kept]), with a bias column folded in where the module has a bias (which then
absorbs the mean of what was removed: FLAP's bias compensation as a special case). Kwon et al. 2022 solve the same
least squares for mask scales only. Layers are refit in order, each fed the already-repaired model's activations
(SparseGPT's sequential scheme).

E, in pre-norm decoders (writers add straight into the residual stream), is how far the cut model's residual
stream is from the unpruned model's at the writer's output: after the attention, and after the layer plus any
dropped layers that follow it (so a dropped block's contribution is taken over by the layer before it, in the
spirit of ReplaceMe, Shopkhoev et al. 2025). alpha = 0 reconstructs each writer's own output only; alpha = 1 asks
each writer to undo all the error upstream, which overfits the calibration text. On ref-llama at 50% removed
(32 x 256 calibration tokens from english/webtext, first 60 windows of 512 tokens of WikiText-2 *validation*):
alpha 0 / 0.2 / 0.3 / 0.4 / 0.5 / 0.7 -> perplexity 86.2 / 82.0 / 82.0 / 82.4 / 83.1 / 85.3, so 0.3
(--repair-correct); the previous scheme (alpha 0, plus the dropped block only) gave 87.1. damp 0.001
(--repair-damp) measured better than 0.01 and 0.1 (at 25% removed 112.8 -> 111.9, at 50% 142.0 -> 140.2, 0.1: 155.8;
WikiText-2 test windows); 0.0001 gave the same as 0.001, so the term only keeps the solve well posed.

Memory: one layer's Gram matrices plus the calibration hidden states [N, L, hidden], twice with alpha > 0 (the
unpruned model's stream runs beside the cut one). The repaired units are written into the full-width model and the
cut units masked to zero, so `surgery.apply` afterwards gives the same function, physically smaller.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter
from .arch.base import in_dim, out_dim
from .layerwise import call_layer, capture_layer_inputs, resident
from .plan import Plan
from .surgery import removed_cuts, zero


@dataclass
class TeacherStream:
    """The unpruned model's residual stream on the calibration batches: inputs[i] (one [1, T, hidden] per batch)
    entering layer i, inputs[L] after the last layer, and mids[i] after layer i's attention. A repair with
    `correct` > 0 runs it beside the cut model; a --params search repairs several candidates on the same batches,
    so it is computed once for all of them ((2L + 1) x tokens x hidden in the model's dtype, the same values the
    repair would compute)."""
    inputs: list[list[torch.Tensor]]
    mids: list[list[torch.Tensor]]


@torch.no_grad()
def teacher_stream(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor]) -> TeacherStream | None:
    """`model` (not yet cut) on `batches`, layer by layer; None where the repair runs no teacher (post-norm)."""
    if not adapter.writes_residual():
        return None
    xs, calls = capture_layer_inputs(model, adapter, batches)
    stream = TeacherStream([xs], [])
    for i, layer in enumerate(adapter.layers()):
        with resident(layer):
            outs, mids = _unpruned_layer(layer, _attention_writers(adapter, layer), stream.inputs[-1],
                                         [c[i] for c in calls])
        stream.inputs.append(outs)
        stream.mids.append(mids)
    return stream


def _unpruned_layer(layer, first, ts, step) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, the stream after the attention) of a layer not yet cut on the unpruned stream `ts`; `first`: its
    attention writers."""
    outs, mids = [], []
    for b, t in enumerate(ts):
        y, seen = _run(layer, t, step[b], first)
        mids.append(t + sum(seen[w][1] for w in first))
        outs.append(y)
    return outs, mids


def _through(layers, js, xs: list[torch.Tensor], calls) -> list[torch.Tensor]:
    """The stream `xs` through layers `js` (dropped ones, on the unpruned stream), one resident at a time."""
    for j in js:
        with resident(layers[j]):
            xs = [call_layer(layers[j], x, calls[b][j]) for b, x in enumerate(xs)]
    return xs


@torch.no_grad()
def repair(model: nn.Module, adapter: Adapter, plan: Plan, batches: list[torch.Tensor], damp: float = 0.001,
           correct: float = 0.3, reselect: bool = False, quiet: bool = False,
           after: Callable[[int], None] | None = None, stream: TeacherStream | None = None) -> None:
    """Mask the plan's cuts into `model` and refit the writers of every kept layer (in place, full width); with
    `correct` > 0 (alpha above) in pre-norm decoders, every kept layer's writers are refit, cut or not. With
    `reselect`, which MLP channels each layer keeps is chosen here by greedy OBS (`obs_keep`), the counts staying
    the plan's; `plan` is updated to the channels kept. `after(i)` runs once kept layer i is final, while it is
    still resident (the streamed prune cuts and writes it then); nothing reads layer i after that. `stream`: the
    unpruned stream on these batches, computed already (teacher_stream)."""
    cuts = removed_cuts(adapter, plan)
    layers = list(adapter.layers())
    if not cuts and len(plan.layers) == len(layers):
        return
    teacher = correct > 0 and adapter.writes_residual()
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    outside = {k: v for k, v in cuts.items() if id(k[0]) not in in_layers}  # hidden channels: embeddings, norms
    if not teacher:
        zero(outside)
    xs, calls = capture_layer_inputs(model, adapter, batches)
    ts = None
    if teacher:
        # the unpruned stream entering the first kept layer, taken before any cut is masked
        ts = stream or TeacherStream([_through(layers, range(plan.layers[0]), [x.clone() for x in xs], calls)], [])
        if outside:
            zero(outside)
            xs = capture_layer_inputs(model, adapter, batches)[0]
    for pos, i in enumerate(tqdm(plan.layers, desc="repair", disable=quiet, leave=False)):
        with resident(layers[i]):
            xs = _repair_layer(adapter, plan, layers, pos, cuts, xs, ts, calls, damp, correct, reselect)
            if after is not None:
                after(i)


def _repair_layer(adapter, plan, layers, pos, cuts, xs, ts, calls, damp, correct, reselect):
    """One kept layer's refit; returns the cut stream after it. `ts` (with a teacher): the unpruned stream, whole
    (a TeacherStream given to repair) or as far as it has been computed (inputs[-1] enters layer i)."""
    i = plan.layers[pos]
    layer, teacher = layers[i], ts is not None
    step = [c[i] for c in calls]
    choose = (lambda grams, cross, i=i: _reselect_mlp(adapter, plan, i, cuts, grams, cross, damp)) \
        if reselect else None
    if teacher:
        nxt = plan.layers[pos + 1] if pos + 1 < len(plan.layers) else len(layers)
        _toward_teacher(adapter, layers, i, nxt, cuts, xs, ts, calls, damp, correct, choose)
    else:
        _fit(layer, [w for w in adapter.writers(layer) if (w, in_dim(w)) in cuts], cuts, xs, step, damp,
             choose=choose)
    zero(_within(cuts, layer))
    return [call_layer(layer, x, step[b]) for b, x in enumerate(xs)]


def _attention_writers(adapter: Adapter, layer: nn.Module) -> list[nn.Module]:
    attn = adapter.attention(layer)
    return [w for w in adapter.writers(layer) if any(w is m for m in attn.modules())]


def _toward_teacher(adapter, layers, i, nxt, cuts, xs, ts: TeacherStream, calls, damp, alpha, choose=None):
    """Refit layer i's attention writers toward the unpruned stream after the attention, then (with the attention
    cut and refit) its MLP writer toward the unpruned stream entering the next kept layer `nxt`; the unpruned stream
    up to `nxt` is computed here unless `ts` holds it already."""
    layer, attn = layers[i], adapter.attention(layers[i])
    step = [c[i] for c in calls]
    first = _attention_writers(adapter, layer)
    rest = [w for w in adapter.writers(layer) if not any(w is m for m in first)]
    if len(ts.inputs) <= nxt:  # not given whole: layer i and the dropped layers after it, on the unpruned stream
        outs, mids = _unpruned_layer(layer, first, ts.inputs[-1], step)
        outs = _through(layers, range(i + 1, nxt), outs, calls)
        ts.inputs[-1:], ts.mids[-1:] = [outs], [mids]  # only the stream entering the next kept layer is kept
    else:
        mids, outs = ts.mids[i], ts.inputs[nxt]
    gap = {w: (lambda b, x, y, seen: mids[b] - x - sum(seen[v][1] for v in first)) for w in first}
    _fit(layer, first, cuts, xs, step, damp, gap, alpha, stop=True)
    zero(_within(cuts, attn))
    mlp = adapter.mlp_out(layer)
    gap = {mlp: lambda b, x, y, seen: outs[b] - y} if mlp is not None else {}
    _fit(layer, rest, cuts, xs, step, damp, gap, alpha, choose)


def _within(cuts: dict, module: nn.Module) -> dict:
    inside = {id(m) for m in module.modules()}
    return {k: v for k, v in cuts.items() if id(k[0]) in inside}


class _Seen(Exception):
    """Raised once every module asked for has run, when the rest of the layer is not needed."""


def _run(layer, x, call, modules, stop: bool = False):
    """Layer output, and (input, output) of each of `modules` on the way; with `stop`, the layer is left as soon as
    all of them have run and the output is None (the attention writers' refit needs no MLP: most of a layer's
    work in the models lopper cuts)."""
    seen = {}

    def grab(module, args, out):
        seen[module] = (args[0], out)
        if stop and len(seen) == len(modules):
            raise _Seen

    hooks = [m.register_forward_hook(grab) for m in modules]
    try:
        return call_layer(layer, x, call), seen
    except _Seen:
        return None, seen
    finally:
        for h in hooks:
            h.remove()


def _fit(layer, writers, cuts, xs, step, damp, gaps=None, alpha=0.0, choose=None, stop=False):
    """Refit `writers` of `layer` on the inputs it sees from the cut stream xs: Gram matrices [X 1]^T [X 1] (the 1
    column only with a bias) and, for the writers in `gaps` (b, x, y, seen) -> E [.., out], X^T E; `choose`
    (grams, cross) may change `cuts` first. `stop`: the gaps do not read the layer's output y (None)."""
    if not writers:
        return
    grams: dict[nn.Module, torch.Tensor] = {}
    cross: dict[nn.Module, torch.Tensor] = {}
    for b, x in enumerate(xs):
        y, seen = _run(layer, x, step[b], writers, stop)
        for w in writers:
            a = seen[w][0].reshape(-1, seen[w][0].shape[-1]).float()
            if w.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            _accumulate(grams, w, a.T @ a)
            if gaps and w in gaps:
                e = gaps[w](b, x, y, seen)
                _accumulate(cross, w, alpha * (a.T @ e.reshape(-1, e.shape[-1]).float()))
    if choose is not None:
        choose(grams, cross)
    for w in writers:
        _refit(w, grams[w], cuts.get((w, in_dim(w))), damp, cross.get(w))


def _accumulate(sums: dict, key, value: torch.Tensor) -> None:
    """sums[key] += value in place: a Gram matrix [I, I] is never held three times (old sum, product, new sum)."""
    if key in sums:
        sums[key] += value
    else:
        sums[key] = value


def _reselect_mlp(adapter: Adapter, plan: Plan, i: int, cuts: dict, grams: dict, cross: dict, damp: float) -> None:
    layer = adapter.layers()[i]
    w, entry, full = adapter.mlp_out(layer), plan.per_layer[i], plan.model["mlp"][i]
    if w is None or w not in grams or len(entry["mlp"]) >= full:
        return
    part = next(p for p in adapter.mlp_parts(layer) if p.module is w and p.dim == in_dim(w))
    entry["mlp"] = obs_keep(grams[w], _with_bias(w), cross.get(w), part.channels(list(range(full))),
                            len(entry["mlp"]), damp)
    cuts.update(removed_cuts(adapter, replace(plan, layers=[i])))  # this layer's modules (and the hidden ones)


def obs_keep(gram: torch.Tensor, weight: torch.Tensor, cross: torch.Tensor | None, cols: torch.Tensor, keep: int,
             damp: float, rounds: int = 32) -> list[int]:
    """Which of the units (unit u = input column cols[u] of a writer W [out, in]) to keep: greedy structured OBS
    (Optimal Brain Surgeon for whole columns, as ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al. 2024, apply it
    to LLMs). From the least-squares fit W0 on all columns, drop the columns whose removal, the others re-fit,
    raises ||X W'^T - Y||^2 least, cost_j = ||W0[:, j]||^2 / [H^-1]_jj; after dropping a set S, W0 and H^-1 are
    updated in closed form. Unlike a score per column (|W| x ||X||), this sees that a column another column can
    stand in for costs little. `rounds` batches of equal size, so the work is a few dense products per round."""
    h = gram.to(torch.float64, copy=True)
    rhs = h @ weight.double().T
    if cross is not None:
        rhs += cross.double()
    hinv = _inverse(_damped(h, damp), lambda: _damped(gram.to(torch.float64, copy=True), damp))
    w = (hinv @ rhs).T  # [out, in (+1)]
    del rhs
    cols = cols.to(hinv.device)
    alive = torch.zeros(hinv.shape[0], dtype=torch.bool, device=hinv.device)
    alive[cols] = True
    left = len(cols) - keep
    per = -(-left // rounds)
    while left > 0:
        cost = w.pow(2).sum(0) / hinv.diagonal()
        cost[~alive] = float("inf")
        s = torch.topk(cost, min(per, left), largest=False).indices
        k = torch.linalg.solve(hinv[s][:, s], hinv[s])  # [|S|, in]
        w.addmm_(w[:, s], k, alpha=-1)  # in place: the [in, in] update is the largest array here
        hinv.addmm_(hinv[:, s], k, alpha=-1)
        alive[s] = False
        left -= len(s)
    return [u for u, c in enumerate(cols.tolist()) if alive[c]]


def _refit(w: nn.Linear, gram: torch.Tensor, gone: torch.Tensor | None, damp: float,
           cross: torch.Tensor | None = None) -> None:
    """Least-squares refit of the kept input columns (and the bias) of `w` to reproduce its full-width output,
    plus alpha E when `cross` = alpha X^T E is given."""
    weight = w.weight.T if out_dim(w) == 1 else w.weight  # [out, in] whatever the layout (GPT-2's Conv1D)
    n_in = weight.shape[1]
    keep = torch.ones(gram.shape[0], dtype=torch.bool, device=gram.device)
    if gone is not None:
        keep[gone.to(gram.device)] = False
    full = _with_bias(w)
    rows = gram[keep]
    rhs = rows @ full.T  # [kept, out] = X_k^T X W^T
    if cross is not None:
        rhs = rhs + cross[keep]
    g = _damped(rows[:, keep].double(), damp)
    del rows
    solved = torch.linalg.solve(g, rhs.double()).T.float()  # [out, kept]; float64: small damping
    del g
    new = torch.zeros_like(full)
    new[:, keep] = solved
    weight.copy_(new[:, :n_in].to(weight.dtype))
    if w.bias is not None:
        w.bias.copy_(new[:, n_in].to(w.bias.dtype))


def _with_bias(w: nn.Module) -> torch.Tensor:
    """W [out, in] in float32 whatever the layout (GPT-2's Conv1D is [in, out]), with the bias as a last column
    [out, in + 1] where the module has one (the Gram matrices then carry the 1 column)."""
    weight = (w.weight.T if out_dim(w) == 1 else w.weight).float()
    return weight if w.bias is None else torch.cat([weight, w.bias.float()[:, None]], 1)


def _inverse(h: torch.Tensor, again) -> torch.Tensor:
    """The inverse of a symmetric positive definite h, overwriting h (Cholesky, then its inverse in place: one
    [n, n] float64 array less at the peak than torch.linalg.inv); if rounding made h indefinite, the general
    inverse of `again()`, a fresh copy of h."""
    _, info = torch.linalg.cholesky_ex(h, out=(h, torch.empty((), dtype=torch.int32, device=h.device)))
    if info.item():
        return torch.linalg.inv(again())
    return torch.cholesky_inverse(h, out=h)


def _damped(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """gram + lambda I in place, lambda = damp x mean(diag gram): the ridge term that keeps every solve well
    posed. Callers pass a copy they own (no identity matrix is built: [in, in] float64 is 380 MB at 6912)."""
    gram.diagonal().add_(damp * gram.diagonal().mean())
    return gram
