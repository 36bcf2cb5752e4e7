"""Importance scores, forward-only, from one pass over calibration text.

Layers: block influence BI_l = 1 - cos(x_l, x_{l+1}) (ShortGPT, Men et al. 2024) and the angular distance
arccos(cos(x_l, x_{l+n})) / pi of a block of n layers (Gromov et al. 2024), averaged over tokens; x_l is the
residual stream entering layer l, x_L the output of the last layer.
Width: every weight of a unit contributes |W_ij| (magnitude) or |W_ij| * ||X_j||_2 (activation-aware, Wanda, Sun et
al. 2023; Minitron's activation criterion in per-weight form), where ||X_j|| is the norm of input channel j of
that Linear over all calibration tokens. Fluctuation (FLAP, An et al. 2024) scores input channel j of an output
projection (o_proj, down_proj: the columns of `adapter.writers`) by Var(X_j) * ||W[:, j]||^2, the sample variance of
that input over calibration tokens times the squared column norm: a channel whose input barely moves can be removed
and its mean folded into a bias. A head sums its channels, a KV group its query heads; FLAP defines nothing for
hidden channels, so hidden falls back to the activation score. A unit's score is the sum over all its Parts (a KV
group adds the scores of its query heads), so a score compares units of one structure, never across structures.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .arch import Adapter, Part
from .arch.base import ExpertTensor, in_dim
from .layerwise import call_layer, capture_layer_inputs, resident, run_tail


LINEAR = (nn.Linear, Conv1D)  # Conv1D (GPT-2) is a Linear with its weight stored [in, out]


@dataclass
class Stats:
    """Sums over calibration tokens. cos[i, j] / angle[i, j]: mean cosine / angular distance between x_i and x_j."""

    tokens: int
    cos: torch.Tensor
    angle: torch.Tensor
    input_sq: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Linear/Conv1D) -> sum of x_j^2 per input
    input_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Linear/Conv1D) -> sum of x_j per input
    input_rows: dict[int, int] = field(default_factory=dict)  # id(Linear/Conv1D) -> rows (tokens) it saw
    extra: dict = field(default_factory=dict)  # family-specific sums (Adapter.calibration_hooks: experts' routing)

    def input_mean_var(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and sample variance of each input channel of `module` over the tokens it saw ([in] each, float32)."""
        n = self.input_rows[id(module)]
        mean = self.input_sum[id(module)] / n
        var = (self.input_sq[id(module)] - n * mean.pow(2)).clamp_min(0) / max(n - 1, 1)
        return mean.float(), var.float()


@torch.no_grad()
def collect(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], quiet: bool = False,
            all_pairs: bool = True) -> Stats:
    """Run the calibration batches ([1, L] token ids each) layer by layer (layerwise.py: one layer resident at a
    time on a streamed model), recording the residual stream at every layer boundary and the squared input norms
    of every Linear. `all_pairs`: the cosine and angle between every two boundaries (Gromov's block distances,
    --layer-metric angular), which keeps every boundary's normalized stream [N, L, hidden] in float32 until the
    end; else only between neighbours (block influence), with memory independent of depth."""
    layers = adapter.layers()
    n = len(layers)
    cos_sum, ang_sum = torch.zeros(n + 1, n + 1), torch.zeros(n + 1, n + 1)
    seen = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    input_sq: dict[int, torch.Tensor] = {}
    input_sum: dict[int, torch.Tensor] = {}
    input_rows: dict[int, int] = {}

    def grab_sq(module, args):
        x = args[0].detach().float()
        x = x.reshape(-1, x.shape[-1]).double()  # float64 sums: the variance is sum_sq - n * mean^2
        input_sq[id(module)] = input_sq.get(id(module), 0) + x.pow(2).sum(0).cpu()
        input_sum[id(module)] = input_sum.get(id(module), 0) + x.sum(0).cpu()
        input_rows[id(module)] = input_rows.get(id(module), 0) + x.shape[0]

    def unit(x):
        return torch.nn.functional.normalize(x.float().reshape(-1, x.shape[-1]), dim=-1)

    def add(i, j, a, b):
        c = (a * b).sum(-1).clamp(-1, 1)  # [T]
        cos_sum[i, j] += c.sum().cpu()
        ang_sum[i, j] += (torch.arccos(c) / torch.pi).sum().cpu()
        seen[i, j] = True

    hooks = [m.register_forward_pre_hook(grab_sq) for m in model.modules() if isinstance(m, LINEAR)]
    extra: dict = {}
    hooks += adapter.calibration_hooks(extra)
    try:
        xs, calls = capture_layer_inputs(model, adapter, batches)
        tokens = sum(x.shape[0] * x.shape[1] for x in xs)
        kept = [[unit(x)] for x in xs] if all_pairs else None
        for i, layer in enumerate(tqdm(layers, desc="calibration", disable=quiet, leave=False)):
            with resident(layer):
                ys = [call_layer(layer, x, calls[b][i]) for b, x in enumerate(xs)]
            for b, (x, y) in enumerate(zip(xs, ys)):
                u = unit(y)
                if all_pairs:
                    kept[b].append(u)
                else:
                    add(i, i + 1, unit(x), u)
            xs = ys
        if all_pairs:
            for b in range(len(xs)):
                for i in range(n + 1):
                    for j in range(i, n + 1):
                        add(i, j, kept[b][i], kept[b][j])
        run_tail(model, adapter, batches, xs)
    finally:
        for h in hooks:
            h.remove()
    cos_sum[~seen], ang_sum[~seen] = float("nan"), float("nan")  # pairs not measured: loud if ever read
    return Stats(tokens=tokens, cos=cos_sum / tokens, angle=ang_sum / tokens, input_sq=input_sq,
                 input_sum=input_sum, input_rows=input_rows, extra=extra)


def block_influence(stats: Stats) -> list[float]:
    n = stats.cos.shape[0] - 1
    return [1.0 - stats.cos[i, i + 1].item() for i in range(n)]


def block_angular(stats: Stats, size: int) -> list[float]:
    """Angular distance between the input of layer l and the output of layer l+size-1, for every start l."""
    n = stats.cos.shape[0] - 1
    return [stats.angle[i, i + size].item() for i in range(n - size + 1)]


def unit_scores(parts: list[Part], n_units: int, stats: Stats | None, metric: str,
                total: torch.Tensor | None = None) -> torch.Tensor:
    """Score per unit: sum over the unit's weights of |W| (metric 'magnitude') or |W| * ||X_in|| ('activation');
    'fluctuation' sums Var(X_j) * ||W[:, j]||^2 over the unit's input columns only (FLAP scores the inputs of the
    output projections; the rows of q/k/v and gate/up add nothing). `total`: add into this [n_units] sum."""
    total = torch.zeros(n_units) if total is None else total
    for p in parts:
        if metric == "fluctuation":
            if isinstance(p.module, LINEAR) and p.dim == in_dim(p.module) and id(p.module) in stats.input_rows:
                var = stats.input_mean_var(p.module)[1]
                norm_sq = p.module.weight.detach().float().pow(2).sum(1 - p.dim).cpu()
                total += (var * norm_sq)[p.offset:p.offset + n_units * p.block].view(n_units, p.block).sum(1)
            continue
        if isinstance(p.module, LINEAR):
            norm = None
            if metric == "activation":
                if id(p.module) not in stats.input_sq:
                    continue  # never ran on calibration text (e.g. a pooler the base model skips)
                norm = stats.input_sq[id(p.module)].sqrt()
            total += p.per_unit(channel_sums(p.module, p.dim, norm), n_units).cpu()
            continue
        if metric == "activation" or not isinstance(p.module, (nn.Embedding, ExpertTensor)):
            continue  # norms carry no weight of their own to rank by; embeddings and experts' tensors see no inputs
        total += p.per_unit(p.module.weight.detach().float().abs(), n_units).cpu()
    return total


ROWS = 4096  # rows of a weight scored at once: a 128K-vocabulary head is never copied whole in float32


def channel_sums(module: nn.Module, dim: int, norm: torch.Tensor | None) -> torch.Tensor:
    """Sum of |W_ij| (x ||X_j|| with `norm`, per input channel j) along every dim other than `dim` of a Linear's or
    Conv1D's weight: [weight.shape[dim]], in float32, computed over blocks of ROWS rows."""
    weight = module.weight.detach()
    norm = None if norm is None else norm.to(weight.device)
    parts = []
    for start in range(0, weight.shape[0], ROWS):
        w = weight[start:start + ROWS].float().abs()
        if norm is not None:
            w = w * (norm[None, :] if in_dim(module) == 1 else norm[start:start + ROWS, None])
        parts.append(w.sum(1) if dim == 0 else w.sum(0))
    return torch.cat(parts) if dim == 0 else torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


@dataclass
class WidthScores:
    heads: dict[int, torch.Tensor]
    kv_heads: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    hidden: torch.Tensor
    other: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # Adapter.extra_parts: experts, ...


def width_scores(adapter: Adapter, stats: Stats | None, metric: str) -> WidthScores:
    """Every structure's unit scores, one layer resident at a time (a streamed model reads each layer once here).
    Hidden channels sum Parts across all layers, in `adapter.hidden_parts()` order whatever is resident."""
    if metric in ("activation", "fluctuation") and stats is None:
        raise ValueError(f"the {metric} metric needs calibration statistics")
    layers = list(adapter.layers())
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    heads, kv, mlp, other = {}, {}, {}, {}
    hidden = torch.zeros(adapter.hidden_size())
    hidden_metric = "activation" if metric == "fluctuation" else metric

    def score_layer(i):
        layer, w = layers[i], adapter.layer_widths(layers[i])
        heads[i] = unit_scores(adapter.head_parts(layer), w["heads"], stats, metric)
        mlp[i] = unit_scores(adapter.mlp_parts(layer), w["mlp"], stats, metric)
        if adapter.has_kv_groups:
            own = unit_scores(adapter.kv_parts(layer), w["kv_heads"], stats, metric)
            kv[i] = own + heads[i].view(w["kv_heads"], -1).sum(1)
        for key, scores in extra_scores(adapter, stats, metric, i).items():
            other.setdefault(key, {})[i] = scores

    with ExitStack() as held:
        current = None
        for part in adapter.hidden_parts():
            i = owner.get(id(part.module.module if isinstance(part.module, ExpertTensor) else part.module))
            if i is not None and i != current:
                held.close()
                held.enter_context(resident(layers[i]))
                current = i
                score_layer(i)
            with resident(part.module):  # an untied embedding or head of a streamed model; else nothing to do
                unit_scores([part], len(hidden), stats, hidden_metric, total=hidden)
    for i in range(len(layers)):
        if i not in heads:
            with resident(layers[i]):
                score_layer(i)
    order = lambda d: dict(sorted(d.items()))  # noqa: E731
    return WidthScores(heads=order(heads), kv_heads=order(kv), mlp=order(mlp), hidden=hidden,
                       other={k: order(v) for k, v in other.items()})


def extra_scores(adapter: Adapter, stats: Stats | None, metric: str, i: int) -> dict[str, torch.Tensor]:
    """Scores of layer i's extra structures (experts, their channels, a shared expert's channels): the adapter's
    own where it has them (routing statistics), else from the Parts."""
    layer = adapter.layers()[i]
    w, out = adapter.layer_widths(layer), {}
    for key, parts in adapter.extra_parts(layer).items():
        own = adapter.custom_scores(i, layer, key, stats.extra if stats else {}, metric) if parts else None
        out[key] = own if own is not None else unit_scores(parts, w[key], stats, metric)
    return out
