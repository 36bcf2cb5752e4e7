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

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .arch import Adapter, Part
from .arch.base import ExpertTensor, in_dim


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
def collect(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], quiet: bool = False) -> Stats:
    """Run the calibration batches ([1, L] token ids each) once, recording the residual stream at every layer
    boundary and the squared input norms of every Linear."""
    layers = adapter.layers()
    n = len(layers)
    cos_sum, ang_sum = torch.zeros(n + 1, n + 1), torch.zeros(n + 1, n + 1)
    input_sq: dict[int, torch.Tensor] = {}
    input_sum: dict[int, torch.Tensor] = {}
    input_rows: dict[int, int] = {}
    stream: list[torch.Tensor] = []

    def grab_in(module, args, kwargs):
        stream.append((args[0] if args else kwargs["hidden_states"]).detach())

    def grab_out(module, args, kwargs, output):
        stream.append((output[0] if isinstance(output, tuple) else output).detach())

    def grab_sq(module, args):
        x = args[0].detach().float()
        x = x.reshape(-1, x.shape[-1]).double()  # float64 sums: the variance is sum_sq - n * mean^2
        input_sq[id(module)] = input_sq.get(id(module), 0) + x.pow(2).sum(0).cpu()
        input_sum[id(module)] = input_sum.get(id(module), 0) + x.sum(0).cpu()
        input_rows[id(module)] = input_rows.get(id(module), 0) + x.shape[0]

    hooks = [layer.register_forward_pre_hook(grab_in, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(grab_out, with_kwargs=True))
    hooks += [m.register_forward_pre_hook(grab_sq) for m in model.modules() if isinstance(m, LINEAR)]
    extra: dict = {}
    hooks += adapter.calibration_hooks(extra)
    tokens = 0
    device = next(model.parameters()).device
    try:
        for ids in tqdm(batches, desc="calibration", disable=quiet, leave=False):
            stream.clear()
            model(input_ids=ids.to(device))
            xs = [torch.nn.functional.normalize(x.float().reshape(-1, x.shape[-1]), dim=-1) for x in stream]
            for i in range(n + 1):
                c = (xs[i][None] * torch.stack(xs[i:])).sum(-1).clamp(-1, 1)  # [n+1-i, T]
                cos_sum[i, i:] += c.sum(-1).cpu()
                ang_sum[i, i:] += (torch.arccos(c) / torch.pi).sum(-1).cpu()
            tokens += xs[0].shape[0]
    finally:
        for h in hooks:
            h.remove()
    return Stats(tokens=tokens, cos=cos_sum / tokens, angle=ang_sum / tokens, input_sq=input_sq,
                 input_sum=input_sum, input_rows=input_rows, extra=extra)


def block_influence(stats: Stats) -> list[float]:
    n = stats.cos.shape[0] - 1
    return [1.0 - stats.cos[i, i + 1].item() for i in range(n)]


def block_angular(stats: Stats, size: int) -> list[float]:
    """Angular distance between the input of layer l and the output of layer l+size-1, for every start l."""
    n = stats.cos.shape[0] - 1
    return [stats.angle[i, i + size].item() for i in range(n - size + 1)]


def unit_scores(parts: list[Part], n_units: int, stats: Stats | None, metric: str) -> torch.Tensor:
    """Score per unit: sum over the unit's weights of |W| (metric 'magnitude') or |W| * ||X_in|| ('activation');
    'fluctuation' sums Var(X_j) * ||W[:, j]||^2 over the unit's input columns only (FLAP scores the inputs of the
    output projections; the rows of q/k/v and gate/up add nothing)."""
    total = torch.zeros(n_units)
    for p in parts:
        if metric == "fluctuation":
            if isinstance(p.module, LINEAR) and p.dim == in_dim(p.module) and id(p.module) in stats.input_rows:
                var = stats.input_mean_var(p.module)[1]
                norm_sq = p.module.weight.detach().float().pow(2).sum(1 - p.dim).cpu()
                total += (var * norm_sq)[p.offset:p.offset + n_units * p.block].view(n_units, p.block).sum(1)
            continue
        w = p.module.weight.detach().float().abs()
        if isinstance(p.module, LINEAR):
            if metric == "activation":
                if id(p.module) not in stats.input_sq:
                    continue  # never ran on calibration text (e.g. a pooler the base model skips)
                norm = stats.input_sq[id(p.module)].to(w.device).sqrt()
                w = w * (norm[None, :] if in_dim(p.module) == 1 else norm[:, None])
        elif metric == "activation" or not isinstance(p.module, (nn.Embedding, ExpertTensor)):
            continue  # norms carry no weight of their own to rank by; embeddings and experts' tensors see no inputs
        total += p.per_unit(w, n_units).cpu()
    return total


@dataclass
class WidthScores:
    heads: dict[int, torch.Tensor]
    kv_heads: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    hidden: torch.Tensor
    other: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # Adapter.extra_parts: experts, ...


def width_scores(adapter: Adapter, stats: Stats | None, metric: str) -> WidthScores:
    if metric in ("activation", "fluctuation") and stats is None:
        raise ValueError(f"the {metric} metric needs calibration statistics")
    heads, kv, mlp = {}, {}, {}
    for i, layer in enumerate(adapter.layers()):
        w = adapter.layer_widths(layer)
        heads[i] = unit_scores(adapter.head_parts(layer), w["heads"], stats, metric)
        mlp[i] = unit_scores(adapter.mlp_parts(layer), w["mlp"], stats, metric)
        if adapter.has_kv_groups:
            own = unit_scores(adapter.kv_parts(layer), w["kv_heads"], stats, metric)
            kv[i] = own + heads[i].view(w["kv_heads"], -1).sum(1)
    hidden = unit_scores(adapter.hidden_parts(), adapter.hidden_size(), stats,
                         "activation" if metric == "fluctuation" else metric)
    return WidthScores(heads=heads, kv_heads=kv, mlp=mlp, hidden=hidden, other=extra_scores(adapter, stats, metric))


def extra_scores(adapter: Adapter, stats: Stats | None, metric: str) -> dict[str, dict[int, torch.Tensor]]:
    """Scores of the adapter's extra structures (experts, their channels, a shared expert's channels): the
    adapter's own where it has them (routing statistics), else from the Parts."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    for i, layer in enumerate(adapter.layers()):
        w = adapter.layer_widths(layer)
        for key, parts in adapter.extra_parts(layer).items():
            own = adapter.custom_scores(i, layer, key, stats.extra if stats else {}, metric) if parts else None
            out.setdefault(key, {})[i] = own if own is not None else unit_scores(parts, w[key], stats, metric)
    return out
