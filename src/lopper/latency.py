"""`--target-speedup S`: choose the plan whose *measured* prefill speed-up is S, from per-structure latency
measurements on the target device (the ZipLM idea: Kurtic et al. 2023, "ZipLM: Inference-Aware Structured Pruning
of Language Models").

1. Table. Shells are cut from the model itself (deep copies, surgery.apply): its first d = min(n, 4) layers at full
   width, at a handful of MLP widths m (multiples of round_to) and at each attention width a (kept KV groups; query
   heads for models without grouped-query attention), and its first layer alone at full width. Each is timed on a
   prefill of batch B x length L (no KV cache, last-position logits only, as `lopper bench` measures it):
       fixed    = max(0, t_1 - (t_d - t_1) / (d - 1))    (embeddings, final norm, lm_head)
       layer(w) = (t_d(w) - fixed) / d
   and times that shrink as a width grows (noise, since all widths are multiples of round_to) are levelled.
   Widths between measured points are interpolated linearly; attention and MLP add up:
       layer(a, m) = layer(a, M) + layer(A, m) - layer(A, M)        (A, M: full widths)
2. Prediction for a plan keeping n' layers at (a, m): time = fixed + n' * layer(a, m), speed-up = time(full) / time.
3. Choice. For every depth (layers dropped by the layer metric) and attention width, the widest MLP whose predicted
   speed-up (times the correction of step 4) reaches S; among those predicted within the tolerance above S (a plan
   far faster than S misses S too; all of them if none is), the plan removing the least importance. Importance removed, as a fraction
   of the model: each dropped layer its share of the summed block influence (ShortGPT); each kept layer 1/n x (the
   attention's share of the layer's parameters x the fraction of attention score mass removed + the same for the
   MLP). With `loss` (plan -> calibration loss; --params-search loss) the best plan per depth is scored by loss.
4. Correction. A copy of the model is cut by the chosen plan and timed against the full model (interleaved, median
   of repeats). If the measured speed-up is more than `tolerance` off S, every prediction is multiplied by the
   error measured / predicted (per depth, interpolated between the depths measured so far: depth and width errors
   differ) and the plan chosen again, for at most `rounds` rounds; the plan measured closest to S is kept.

`timer(model) -> seconds` of one prefill is injectable: tests use a deterministic cost model (FLOPs + a constant).
Hidden channels are not varied (their cut changes every shape at once); the plan keeps them all.
"""
from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .arch import Adapter
from .bench import interleaved, prefill_fn
from .errors import LopperError
from .importance import Stats, WidthScores, block_influence
from .plan import Plan, identity_plan
from .select import Target, heads_valid, keep_layers, choose
from .surgery import apply, silenced

log = logging.getLogger("lopper")
Timer = Callable[[torch.nn.Module], float]


def prefill_timer(batch: int, length: int, device: str) -> Timer:
    """model -> seconds of one forward of random ids [batch, length] without cache (bench.prefill_fn)."""
    return lambda model: prefill_fn(model, batch, length, device)()


def median_times(models: list, timer: Timer, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Median seconds per model, the models taking turns (bench.interleaved)."""
    runs = interleaved([lambda m=m: timer(m) for m in models], repeats, warmup)
    return [statistics.median(r) for r in runs]


def attention_options(adapter: Adapter) -> list[tuple[int, int | None]]:
    """Kept (query heads, KV heads) the config class accepts, widest last: whole KV groups under grouped-query
    attention, else query heads."""
    w = adapter.layer_widths(adapter.layers()[0])
    n_heads, n_kv = w["heads"], w.get("kv_heads")
    if n_kv is not None and n_kv < n_heads:
        counts = [(g * (n_heads // n_kv), g) for g in range(1, n_kv + 1)]
    else:
        counts = [(h, None if n_kv is None else h) for h in range(1, n_heads + 1)]
    return [c for c in counts if c == counts[-1] or heads_valid(adapter, c)]


def _width_plan(adapter: Adapter, layers: int, heads: int, kv: int | None, mlp: int) -> Plan:
    """The first `layers` layers, each keeping its first heads / KV heads / MLP channels (speed only)."""
    p = identity_plan(adapter)
    p.layers = p.layers[:layers]
    for i in p.layers:
        e = p.per_layer[i]
        e["mlp"] = e["mlp"][:mlp]
        e["heads"] = e["heads"][:heads]
        if "kv_heads" in e:
            e["kv_heads"] = e["kv_heads"][:kv if kv is not None else heads]
    return p


def _shell(model, adapter: Adapter, plan: Plan):
    shell = copy.deepcopy(model)
    with silenced():
        apply(shell, type(adapter)(shell), plan)
    return shell


def _points(full: int, k: int) -> list[int]:
    """A handful of widths from k to full, multiples of k."""
    pts = {max(k, min(full, round(full * f / k) * k)) for f in (0.25, 0.5, 0.75)}
    return sorted(pts | {k if full >= k else 1, full})


@dataclass
class Table:
    fixed: float
    layer_full: float
    attn: dict[int, float]  # kept heads -> seconds of one layer at full MLP
    mlp: dict[int, float]  # kept channels -> seconds of one layer at full attention
    heads_full: int
    mlp_full: int

    def layer(self, heads: int, mlp: int) -> float:
        return self._at(self.attn, heads) + self._at(self.mlp, mlp) - self.layer_full

    def time(self, layers: int, heads: int, mlp: int) -> float:
        return self.fixed + layers * self.layer(heads, mlp)

    @staticmethod
    def _at(points: dict[int, float], x: int) -> float:
        xs = sorted(points)
        return float(np.interp(x, xs, [points[v] for v in xs]))

    def as_dict(self) -> dict:
        return {"fixed_s": self.fixed, "layer_full_s": self.layer_full, "attention_heads_s": self.attn,
                "mlp_channels_s": self.mlp}


def measure_table(model, adapter: Adapter, round_to: int, timer: Timer, repeats: int = 3) -> Table:
    """Time shells of the model (module docstring, step 1)."""
    n = len(adapter.layers())
    w = adapter.layer_widths(adapter.layers()[0])
    heads0, kv0, mlp0 = w["heads"], w.get("kv_heads"), w["mlp"]
    d = min(n, 4)
    base = _shell(model, adapter, _width_plan(adapter, d, heads0, kv0, mlp0))
    base_adapter = type(adapter)(base)
    opts = attention_options(adapter)
    if len(opts) > 5:
        opts = [opts[round(i * (len(opts) - 1) / 4)] for i in range(5)]
    attn_pts = [c for c in opts if c[0] != heads0]
    mlp_pts = [m for m in _points(mlp0, round_to) if m != mlp0]
    shells = [base, _shell(base, base_adapter, _width_plan(base_adapter, 1, heads0, kv0, mlp0))]
    shells += [_shell(base, base_adapter, _width_plan(base_adapter, d, h, kv, mlp0)) for h, kv in attn_pts]
    shells += [_shell(base, base_adapter, _width_plan(base_adapter, d, heads0, kv0, m)) for m in mlp_pts]
    t = median_times(shells, timer, repeats=repeats)
    del shells, base
    t_d, t_1 = t[0], t[1]
    fixed = max(0.0, t_1 - (t_d - t_1) / (d - 1)) if d > 1 else 0.0  # noise can make the difference negative
    layer_full = (t_d - fixed) / d
    per = lambda s: (s - fixed) / d
    attn = _monotone({heads0: layer_full} | {h: per(s) for (h, _), s in zip(attn_pts, t[2:2 + len(attn_pts)])})
    mlp = _monotone({mlp0: layer_full} | {m: per(s) for m, s in zip(mlp_pts, t[2 + len(attn_pts):])})
    return Table(fixed=fixed, layer_full=layer_full, attn=attn, mlp=mlp, heads_full=heads0, mlp_full=mlp0)


def _monotone(points: dict[int, float]) -> dict[int, float]:
    """Widths that are all multiples of round_to never get faster by growing: noise that says so is levelled
    (each time is at least the time of the narrower point before it)."""
    out, top = {}, 0.0
    for x in sorted(points):
        top = max(top, points[x])
        out[x] = top
    return out


def _removed_mass(score: torch.Tensor) -> np.ndarray:
    """r[j] = fraction of the score mass removed when the top j units are kept (j = 0 .. n)."""
    s = torch.sort(score.float().clamp(min=0), descending=True).values
    total = float(s.sum()) or 1.0
    kept = np.concatenate([[0.0], torch.cumsum(s, 0).numpy() / total])
    return 1.0 - kept


class Importance:
    """Importance a plan removes, as a fraction of the model (module docstring, step 3)."""

    def __init__(self, adapter: Adapter, stats: Stats | None, scores: WidthScores):
        layers = adapter.layers()
        n = len(layers)
        bi = torch.ones(n) if stats is None else torch.tensor(block_influence(stats), dtype=torch.float64).clamp(min=0)
        self.layer_share = (bi / bi.sum() if float(bi.sum()) > 0 else torch.full((n,), 1 / n)).tolist()
        gqa = bool(scores.kv_heads) and any(scores.kv_heads[i].numel() < scores.heads[i].numel() for i in range(n))
        self.group = scores.heads[0].numel() // scores.kv_heads[0].numel() if gqa else 1
        self.attn = [_removed_mass(scores.kv_heads[i] if gqa else scores.heads[i]) for i in range(n)]
        self.mlp = [_removed_mass(scores.mlp[i]) for i in range(n)]
        a = sum(p.numel() for p in adapter.attention(layers[0]).parameters())
        m = sum(lin.weight.numel() for lin in adapter.mlp_in(layers[0]) + [adapter.mlp_out(layers[0])])
        self.f_attn, self.f_mlp, self.n = a / (a + m), m / (a + m), n

    def removed(self, kept_layers: list[int], heads: int, mlp: int) -> float:
        units = heads // self.group
        gone = sum(self.layer_share) - sum(self.layer_share[i] for i in kept_layers)
        width = sum(self.f_attn * self.attn[i][units] + self.f_mlp * self.mlp[i][mlp] for i in kept_layers)
        return gone + width / self.n


def candidates(table: Table, imp: Importance, adapter: Adapter, kept_layers: Callable[[int], list[int]], free: int,
               goal: float, round_to: int, correction: Callable[[int], float], ceiling: float) -> list[dict]:
    """Per depth, the (attention, MLP) plan with corrected predicted speed-up in [goal, ceiling] that removes the
    least importance. kept_layers(drop): the layers the layer metric keeps; correction(drop): measured / predicted
    speed-up for that depth."""
    n = len(adapter.layers())
    t_full = table.time(n, table.heads_full, table.mlp_full)
    mlp0 = table.mlp_full
    mlps = sorted(set(range(round_to, mlp0 + 1, round_to)) | {mlp0})
    out = []
    for drop in range(free + 1):
        best = None
        for heads, kv in attention_options(adapter):
            speed = {m: t_full / table.time(n - drop, heads, m) for m in mlps}
            fits = [m for m in mlps if goal <= speed[m] * correction(drop) <= ceiling]
            if not fits:
                continue
            m = max(fits)
            c = {"drop_layers": drop, "heads": heads, "kv_heads": kv, "mlp": m, "predicted": speed[m],
                 "corrected": speed[m] * correction(drop), "removed": imp.removed(kept_layers(drop), heads, m)}
            if best is None or c["removed"] < best["removed"]:
                best = c
        if best is not None:
            out.append(best)
    return out


def _kept_layers(stats: Stats | None, target: Target, n: int) -> Callable[[int], list[int]]:
    cache: dict[int, list[int]] = {}

    def kept(drop: int) -> list[int]:
        if drop not in cache:
            cache[drop] = keep_layers(stats, Target(**{**vars(target), "drop_layers": drop}), n)
        return cache[drop]

    return kept


def plan_for(adapter: Adapter, target: Target, stats, scores, c: dict, round_to: int) -> Plan:
    """The plan of a candidate, chosen by the usual rules (select.choose) from fractions that land on its widths."""
    w = adapter.layer_widths(adapter.layers()[0])
    heads0, kv0 = w["heads"], w.get("kv_heads")
    units0, units = (kv0, c["kv_heads"]) if kv0 is not None and kv0 < heads0 else (heads0, c["heads"])
    t = Target(**{**vars(target), "drop_layers": c["drop_layers"], "heads": 1 - units / units0,
                  "mlp": 1 - c["mlp"] / w["mlp"], "hidden": 0.0, "round_to": round_to})
    return choose(adapter, t, stats, scores)


def solve_speedup(model, adapter: Adapter, target: Target, stats: Stats | None, scores: WidthScores, speedup: float,
                  timer: Timer, loss=None, rounds: int = 4, tolerance: float = 0.05, repeats: int = 3) -> Plan:
    """The plan whose measured speed-up under `timer` is within `tolerance` of `speedup` (module docstring)."""
    if speedup <= 1.0:
        raise LopperError(f"--target-speedup {speedup} is not a speed-up: give a factor above 1, e.g. 1.5")
    k = target.round_to
    n = len(adapter.layers())
    free = max(0, n - target.protect_first - target.protect_last)
    kept = _kept_layers(stats, target, n)
    table = measure_table(model, adapter, k, timer, repeats=repeats)
    imp = Importance(adapter, stats, scores)
    history, seen = [], set()
    for r in range(rounds):
        errors = {h["drop_layers"]: h["measured"] / h["predicted"] for h in history}  # latest per depth
        corr = lambda d: float(np.interp(d, sorted(errors), [errors[e] for e in sorted(errors)])) if errors else 1.0
        cands = (candidates(table, imp, adapter, kept, free, speedup, k, corr, speedup * (1 + tolerance))
                 or candidates(table, imp, adapter, kept, free, speedup, k, corr, float("inf")))
        if not cands:
            if r == 0:
                t_full = table.time(n, table.heads_full, table.mlp_full)
                fastest = max(t_full / table.time(n - free, h, min(k, table.mlp_full))
                              for h, _ in attention_options(adapter))
                raise LopperError(f"--target-speedup {speedup} is out of reach: the fastest plan allowed (round_to "
                                  f"{k}, protected layers) is predicted at {fastest:.2f}x; lower --target-speedup "
                                  "or --protect-first/--protect-last")
            break
        scored = sorted(cands, key=lambda c: c["removed"])[:5]
        if loss is not None:
            for c in scored:
                c["loss"] = loss(plan_for(adapter, target, stats, scores, c, k))
        best = min(scored, key=lambda c: c.get("loss", c["removed"]))
        key = (best["drop_layers"], best["heads"], best["mlp"])
        if key in seen:
            break  # the corrected table picks a plan already measured: nothing closer to try
        seen.add(key)
        plan = plan_for(adapter, target, stats, scores, best, k)
        pruned = _shell(model, adapter, plan)
        t_full, t_pruned = median_times([model, pruned], timer, repeats=repeats)
        del pruned
        best = {**best, "measured": t_full / t_pruned, "plan": plan}
        history.append(best)
        log.info(f"target speed-up {speedup}: round {r + 1} predicted {best['predicted']:.3f}x (corrected "
                 f"{best['corrected']:.3f}x), measured {best['measured']:.3f}x")
        if abs(best["measured"] / speedup - 1) <= tolerance:
            break
    chosen = min(history, key=lambda h: abs(h["measured"] / speedup - 1))
    plan = chosen["plan"]
    plan.meta["speedup"] = {
        "target": speedup, "predicted": round(chosen["predicted"], 4), "measured": round(chosen["measured"], 4),
        "within_tolerance": abs(chosen["measured"] / speedup - 1) <= tolerance, "tolerance": tolerance,
        "rounds": [{k2: (round(v, 4) if isinstance(v, float) else v) for k2, v in h.items() if k2 != "plan"}
                   for h in history],
        "table": table.as_dict()}
    if not plan.meta["speedup"]["within_tolerance"]:
        log.warning(f"--target-speedup {speedup}: the closest plan measured {chosen['measured']:.3f}x")
    return plan
