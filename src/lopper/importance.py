"""Importance scores, forward-only, from one pass over calibration text.

Layers: block influence BI_l = 1 - cos(x_l, x_{l+1}) (ShortGPT, Men et al. 2024) and the angular distance
arccos(cos(x_l, x_{l+n})) / pi of a block of n layers (Gromov et al. 2024), averaged over tokens; x_l is the
residual stream entering layer l, x_L the output of the last layer.
Width: every weight of a unit contributes |W_ij| (magnitude) or |W_ij| * ||X_j||_2 (activation-aware, Wanda, Sun et
al. 2023; Minitron's activation criterion in per-weight form), where ||X_j|| is the norm of input channel j of
that Linear over all calibration tokens. A unit's score is the sum over all its Parts (a KV group adds the scores
of its query heads), so a score compares units of one structure, never across structures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .arch import Adapter, Part
from .arch.base import in_dim


LINEAR = (nn.Linear, Conv1D)  # Conv1D (GPT-2) is a Linear with its weight stored [in, out]


@dataclass
class Stats:
    """Sums over calibration tokens. cos[i, j] / angle[i, j]: mean cosine / angular distance between x_i and x_j."""

    tokens: int
    cos: torch.Tensor
    angle: torch.Tensor
    input_sq: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Linear/Conv1D) -> sum of x_j^2 per input


@torch.no_grad()
def collect(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], quiet: bool = False) -> Stats:
    """Run the calibration batches ([1, L] token ids each) once, recording the residual stream at every layer
    boundary and the squared input norms of every Linear."""
    layers = adapter.layers()
    n = len(layers)
    cos_sum, ang_sum = torch.zeros(n + 1, n + 1), torch.zeros(n + 1, n + 1)
    input_sq: dict[int, torch.Tensor] = {}
    stream: list[torch.Tensor] = []

    def grab_in(module, args, kwargs):
        stream.append((args[0] if args else kwargs["hidden_states"]).detach())

    def grab_out(module, args, kwargs, output):
        stream.append((output[0] if isinstance(output, tuple) else output).detach())

    def grab_sq(module, args):
        x = args[0].detach().float()
        sq = x.pow(2).reshape(-1, x.shape[-1]).sum(0).cpu()
        input_sq[id(module)] = input_sq.get(id(module), 0) + sq

    hooks = [layer.register_forward_pre_hook(grab_in, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(grab_out, with_kwargs=True))
    hooks += [m.register_forward_pre_hook(grab_sq) for m in model.modules() if isinstance(m, LINEAR)]
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
    return Stats(tokens=tokens, cos=cos_sum / tokens, angle=ang_sum / tokens, input_sq=input_sq)


def block_influence(stats: Stats) -> list[float]:
    n = stats.cos.shape[0] - 1
    return [1.0 - stats.cos[i, i + 1].item() for i in range(n)]


def block_angular(stats: Stats, size: int) -> list[float]:
    """Angular distance between the input of layer l and the output of layer l+size-1, for every start l."""
    n = stats.cos.shape[0] - 1
    return [stats.angle[i, i + size].item() for i in range(n - size + 1)]


def unit_scores(parts: list[Part], n_units: int, stats: Stats | None, metric: str) -> torch.Tensor:
    """Score per unit: sum over the unit's weights of |W| (metric 'magnitude') or |W| * ||X_in|| ('activation')."""
    total = torch.zeros(n_units)
    for p in parts:
        w = p.module.weight.detach().float().abs()
        if isinstance(p.module, LINEAR):
            if metric == "activation":
                if id(p.module) not in stats.input_sq:
                    continue  # never ran on calibration text (e.g. a pooler the base model skips)
                norm = stats.input_sq[id(p.module)].to(w.device).sqrt()
                w = w * (norm[None, :] if in_dim(p.module) == 1 else norm[:, None])
        elif metric == "activation" or not isinstance(p.module, nn.Embedding):
            continue  # norms carry no weight of their own to rank by; embeddings see no activations
        per_channel = w.sum(dim=1 - p.dim).cpu()
        total += per_channel[p.offset:p.offset + n_units * p.block].view(n_units, p.block).sum(1)
    return total


@dataclass
class WidthScores:
    heads: dict[int, torch.Tensor]
    kv_heads: dict[int, torch.Tensor]
    mlp: dict[int, torch.Tensor]
    hidden: torch.Tensor


def width_scores(adapter: Adapter, stats: Stats | None, metric: str) -> WidthScores:
    if metric == "activation" and stats is None:
        raise ValueError("the activation metric needs calibration statistics")
    heads, kv, mlp = {}, {}, {}
    for i, layer in enumerate(adapter.layers()):
        w = adapter.layer_widths(layer)
        heads[i] = unit_scores(adapter.head_parts(layer), w["heads"], stats, metric)
        mlp[i] = unit_scores(adapter.mlp_parts(layer), w["mlp"], stats, metric)
        if adapter.has_kv_groups:
            own = unit_scores(adapter.kv_parts(layer), w["kv_heads"], stats, metric)
            kv[i] = own + heads[i].view(w["kv_heads"], -1).sum(1)
    hidden = unit_scores(adapter.hidden_parts(), adapter.hidden_size(), stats, metric)
    return WidthScores(heads=heads, kv_heads=kv, mlp=mlp, hidden=hidden)
