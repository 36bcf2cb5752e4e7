"""Non-uniform widths (`--allocation global`): one ranking of a structure's units across all kept layers.

Uniform selection keeps the same count in every layer and ranks units within a layer only. Global allocation keeps
the same total (uniform count x kept layers) but lets layers that matter more keep more, as FLAP (An et al. 2024)
and OWL-style per-layer budgets do: layer i keeps a prefix of its own ranking, and the prefix lengths come from one
sorted list of every layer's units. Units are taken in chunks that keep each width legal:

- MLP channels: chunks of `round_to` channels (chunk value: mean score of the chunk), so widths stay multiples of it;
- KV groups (when whole groups go): one group per chunk, with all its query heads;
- query heads within every KV group (or heads of models without KV groups): one chunk is one more head in every
  group (value: mean over groups of each group's next best head), so every kept group keeps the same count (GQA).

Every layer keeps at least `min_keep` of the original width of each structure (rounded up to whole chunks, and
never more than the uniform count), so no layer is emptied or starved.

Comparable across layers: each layer's scores standardized (`NORMALIZE = "zscore"`: minus the layer's mean, over
its standard deviation, as FLAP does), so a layer keeps more where its own scores are spread out, not where the
residual stream it writes into is large. Raw scores (`"raw"`) follow the stream's size: in a real model (SmolLM2-135M)
that grows 20x with depth, so raw scores starve the early layers and `--params 0.25` gave perplexity 221.56; with
z-scores 83.42 (first 40 WikiText-2 test windows, lsq repair, width only). On ref-llama (20M training tokens, a flat
stream) raw was better, 111.97 against 116.08 on the same windows; the real model decides (docs/allocation.md).
Dividing by the layer's mean (`"mean"`) lost to uniform widths on ref-llama (119.7 vs 118.7 at --params 0.25).
"""
from __future__ import annotations

import math

import torch

NORMALIZE = "zscore"  # "zscore": (score - layer mean) / layer std; "raw": as they are; "mean": score / layer mean


def _norm(score: torch.Tensor) -> torch.Tensor:
    s = score.float()
    if NORMALIZE == "zscore":
        return (s - s.mean()) / s.std().clamp_min(1e-30) if s.numel() > 1 else s * 0
    return s / s.mean().clamp_min(1e-30) if NORMALIZE == "mean" else s


def allocate(values: dict[int, torch.Tensor], least: int, total: int) -> dict[int, int]:
    """Chunks per layer. values[i]: the chunk values of layer i, non-increasing; every layer gets `least`, the rest
    of `total` goes to the best remaining chunks of all layers. Ties go to earlier chunks, so each layer's chosen
    chunks are a prefix of its ranking."""
    count = {i: least for i in values}
    rest = sorted((-float(v[j]), i, j) for i, v in values.items() for j in range(least, len(v)))
    for _, i, _ in rest[:total - least * len(values)]:
        count[i] += 1
    return count


def least_chunks(min_keep: float, full: int, chunk: int, uniform_chunks: int) -> int:
    return max(1, min(uniform_chunks, math.ceil(min_keep * full / chunk - 1e-9)))


def global_mlp(mlp_scores: dict[int, torch.Tensor], layers: list[int], keep: int, k: int, full: int,
               min_keep: float) -> dict[int, list[int]]:
    """Kept MLP channels per layer: len(layers) * keep in all, multiples of k (1 when full < k) per layer."""
    k = k if full >= k else 1
    if keep >= full or keep % k:
        return {i: sorted(torch.topk(mlp_scores[i], keep).indices.tolist()) for i in layers}
    order = {i: torch.argsort(_norm(mlp_scores[i]), descending=True, stable=True) for i in layers}
    chunks = full // k
    values = {i: _norm(mlp_scores[i])[order[i][:chunks * k]].view(chunks, k).mean(1) for i in layers}
    count = allocate(values, least_chunks(min_keep, full, k, keep // k), len(layers) * keep // k)
    return {i: sorted(order[i][:count[i] * k].tolist()) for i in layers}


def global_heads(scores, layers: list[int], n_heads: int, n_kv: int | None, heads_keep: int, kv_keep: int | None,
                 min_keep: float) -> dict[int, dict[str, list[int]]]:
    """Kept heads (and KV groups) per layer: len(layers) * heads_keep heads in all, under the GQA rule."""
    if kv_keep is not None and kv_keep < n_kv:  # whole KV groups go: rank groups
        group = n_heads // n_kv
        order = {i: torch.argsort(_norm(scores.kv_heads[i]), descending=True, stable=True) for i in layers}
        values = {i: _norm(scores.kv_heads[i])[order[i]] for i in layers}
        count = allocate(values, least_chunks(min_keep, n_kv, 1, kv_keep), len(layers) * kv_keep)
        out = {}
        for i in layers:
            kv = sorted(order[i][:count[i]].tolist())
            out[i] = {"heads": [g * group + j for g in kv for j in range(group)], "kv_heads": kv}
        return out
    groups = n_kv or 1  # query heads within every group; no KV groups: one group of all heads
    group = n_heads // groups
    ranked = {i: torch.sort(_norm(scores.heads[i]).view(groups, group), dim=1, descending=True, stable=True)
              for i in layers}
    values = {i: ranked[i].values.mean(0) for i in layers}
    per_group = heads_keep // groups
    count = allocate(values, least_chunks(min_keep, group, 1, per_group), len(layers) * per_group)
    out = {}
    for i in layers:
        idx = ranked[i].indices[:, :count[i]]
        heads = sorted(g * group + j for g in range(groups) for j in idx[g].tolist())
        out[i] = {"heads": heads} if n_kv is None else {"heads": heads, "kv_heads": list(range(n_kv))}
    return out
