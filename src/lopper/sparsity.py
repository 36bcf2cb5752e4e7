"""Unstructured and N:M sparsity on what remains after structured pruning (or on an unpruned model).

Zeroes a fraction of the weights of the Linear (and GPT-2 Conv1D) modules inside the decoder/encoder layers; the
embeddings, the lm_head and anything outside the layers are never candidates. Zeros are stored in the ordinary
dense tensors, so the output stays a standard checkpoint; which weights were zeroed is recorded twice: the achieved
fraction per module in the plan (`"sparsity"` key of lopper_plan.json) and the masks themselves, bit-packed, in
`lopper_masks.npz` beside the weights, so that `lopper prune --plan DIR/lopper_plan.json` re-applies exactly the
same masks. (Not a `.safetensors` file on purpose: loaders such as vLLM read every `*.safetensors` of a folder
without an index as weights.)

Criteria, each scoring weight W_ij (output i, input j) of one module:
- magnitude: |W_ij|; no calibration.
- wanda: |W_ij| * ||X_j||_2, X_j the j-th input channel over all calibration tokens (Sun et al. 2023).
- sparsegpt: OBS-style pruning (Frantar & Alistarh 2023). With H = 2 X^T X / N + damp * mean(diag) * I (damp 0.01)
  and the upper Cholesky factor U of H^-1, columns are visited left to right in blocks of 128; in each block the
  mask is chosen by w^2 / U_cc^2 (adaptive mask selection), each pruned weight's error is spread over the
  remaining columns of its row (W_:,c+1: -= err_c U_c,c+1:), and the block's error is applied to the later
  columns at once (lazy batch update).
Wanda and SparseGPT are sequential: layer l is scored on the activations of layers 0..l-1 as already sparsified
(both papers' reference code); every module of one layer sees that layer's dense input.

Patterns and scopes:
- unstructured, scope `row`: every output row of a module loses round(s * in) weights (Wanda's default);
  `layer`: each module loses round(s * numel), anywhere; `global`: one threshold over all candidate weights
  (magnitude and wanda only; wanda then uses one pass of dense activations). For SparseGPT the row / layer counts
  are met per block of columns, cumulatively rounded, so the module totals are the same.
- N:M (2:4, 4:8, ...): at most N nonzeros in every group of M consecutive inputs of a row; a final partial group
  of r < M inputs keeps at most N. The fraction is then fixed at 1 - N/M: `--sparsity` may be left at 0 (the
  pattern alone turns sparsity on) or given as exactly 1 - N/M; anything else is refused. The scope does not apply.

Allocation: `uniform` gives every layer the target; `owl` (Yin et al. 2024) measures each layer's outlier ratio D_l,
the share of Wanda scores above M = 5 times the layer's mean score (dense activations), maps D_l linearly onto
[0, 2 * lambda] (lambda = 0.08) and gives layer l the sparsity s + mean - that value, so layers with more outliers
are pruned less. The mean is weighted by each layer's number of candidate weights (the plain mean of the paper when
the layers are equally wide), so the overall fraction is the target; ratios are clipped to [0, 0.99].

Module names (for `--sparsity-ignore`, a regex searched in them, and in the plan) are those of the model as
saved, i.e. after structured surgery: layers renumbered 0..n-1.
"""
from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .arch import Adapter
from .errors import LopperError
from .layerwise import call_layer, capture_layer_inputs

log = logging.getLogger("lopper")

MASKS_FILE = "lopper_masks.npz"
MASKS_FORMAT = "lopper-masks/1"
LINEAR = (nn.Linear, Conv1D)
CRITERIA = ("magnitude", "wanda", "sparsegpt")
SCOPES = ("row", "layer", "global")
ALLOCATIONS = ("uniform", "owl")
OWL_LAMBDA = 0.08
OWL_M = 5.0
BLOCK = 128
DAMP = 0.01
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    """The sparsity settings (the `sparsity_*` fields of api.Selection without the prefix)."""

    sparsity: float = 0.0
    pattern: str = "unstructured"
    criterion: str = "wanda"
    scope: str = "row"
    ignore: str = ""
    allocation: str = "uniform"

    @classmethod
    def from_args(cls, args) -> Spec:
        return cls(sparsity=args.sparsity, pattern=args.sparsity_pattern, criterion=args.sparsity_criterion,
                   scope=args.sparsity_scope, ignore=args.sparsity_ignore, allocation=args.sparsity_allocation)

    @classmethod
    def from_settings(cls, d: dict) -> Spec:
        return cls(**{k: d[k] for k in asdict(cls()) if k in d})

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern == "unstructured":
            return None
        m = _NM.match(str(self.pattern))
        if not m:
            raise LopperError(f"--sparsity-pattern {self.pattern!r} is unknown: use unstructured or N:M such as 2:4 "
                              "or 4:8 (N nonzeros in every M inputs)")
        return int(m.group(1)), int(m.group(2))

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.pattern != "unstructured"

    @property
    def target(self) -> float:
        """The fraction zeroed: --sparsity, or 1 - N/M for N:M."""
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    def check(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LopperError(f"--sparsity {self.sparsity} is out of range: give the fraction of the remaining "
                              "weights to zero, 0 <= F < 1")
        for flag, value, allowed in (("--sparsity-criterion", self.criterion, CRITERIA),
                                     ("--sparsity-scope", self.scope, SCOPES),
                                     ("--sparsity-allocation", self.allocation, ALLOCATIONS)):
            if value not in allowed:
                raise LopperError(f"{flag} {value!r} is unknown: use {', '.join(allowed)}")
        try:
            re.compile(self.ignore)
        except re.error as e:
            raise LopperError(f"--sparsity-ignore {self.ignore!r} is not a regular expression ({e}): fix it")
        nm = self.nm
        if not self.active:
            if self != Spec(sparsity=self.sparsity):
                raise LopperError("the --sparsity-* options do nothing without --sparsity F or an N:M "
                                  "--sparsity-pattern: add one or drop them")
            return
        if nm:
            n, m = nm
            if not 0 < n < m:
                raise LopperError(f"--sparsity-pattern {self.pattern} keeps {n} of every {m} weights: N:M needs "
                                  "0 < N < M")
            if self.sparsity and abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise LopperError(f"--sparsity-pattern {self.pattern} zeroes {1 - n / m:g} of the weights, not "
                                  f"{self.sparsity:g}: pass --sparsity {1 - n / m:g} or leave --sparsity at 0")
            if self.scope != "row":
                raise LopperError(f"--sparsity-scope {self.scope} is for unstructured sparsity; N:M always counts "
                                  "per group of M inputs: drop --sparsity-scope")
            if self.allocation == "owl":
                raise LopperError("--sparsity-allocation owl varies the fraction per layer, which a fixed N:M "
                                  "pattern cannot: use --sparsity-pattern unstructured or uniform allocation")
        if self.scope == "global" and self.criterion == "sparsegpt":
            raise LopperError("--sparsity-criterion sparsegpt prunes layer by layer and cannot rank weights "
                              "globally: use --sparsity-scope row or layer")
        if self.scope == "global" and self.allocation == "owl":
            raise LopperError("--sparsity-allocation owl sets a fraction per layer and --sparsity-scope global one "
                              "threshold for all: choose one of them")

    def needs_calibration(self, have_masks: bool = False) -> bool:
        if not self.active:
            return False
        if have_masks:
            return self.criterion == "sparsegpt"  # the weight updates are recomputed for the recorded masks
        return self.criterion != "magnitude" or self.allocation == "owl"

    def settings(self) -> dict:
        return {**asdict(self), "target": round(self.target, 6)}


def check_args(args) -> None:
    """Validate the --sparsity-* options of an api.Selection (LopperError one-liners)."""
    spec = Spec.from_args(args)
    if args.plan and spec != Spec() and _plan_entry_on_disk(args.plan):
        raise LopperError("--plan replays a plan as it is, its sparsity included: drop the --sparsity options")
    spec.check()


def _plan_entry_on_disk(plan_path: str) -> dict | None:
    try:
        return json.loads(Path(plan_path).read_text()).get("sparsity")
    except (OSError, ValueError, AttributeError):
        return None  # Plan.load reports the problem


def needs_calibration(args) -> bool:
    """Whether the sparsity requested by `args` (or recorded in the plan it replays) needs calibration windows."""
    entry = _plan_entry_on_disk(args.plan) if args.plan else None
    if entry:
        return Spec.from_settings(entry).needs_calibration(bool(entry.get("masks")))
    return Spec.from_args(args).needs_calibration()


def plan_settings(args) -> dict | None:
    """The plan's "sparsity" entry for a dry run (`lopper plan`): the settings, no masks yet (None: none asked)."""
    spec = Spec.from_args(args)
    return spec.settings() if spec.active else None


# ---- what is sparsified -----------------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    module: nn.Module
    layer: int

    def weight(self) -> torch.Tensor:
        """The weight as [out, in] (a view: Conv1D stores [in, out])."""
        w = self.module.weight
        return w.T if isinstance(self.module, Conv1D) else w


def targets(model: nn.Module, adapter: Adapter, ignore: str = "") -> list[Target]:
    """Every Linear / Conv1D inside the layers whose name does not match `ignore`."""
    names = {id(m): n for n, m in model.named_modules()}
    pattern = re.compile(ignore) if ignore else None
    out = []
    for i, layer in enumerate(adapter.layers()):
        for m in layer.modules():
            if isinstance(m, LINEAR) and id(m) in names and not (pattern and pattern.search(names[id(m)])):
                out.append(Target(names[id(m)], m, i))
    return out


# ---- mask selection ---------------------------------------------------------------------------------------------
def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of `score`) of exactly the k lowest entries; ties broken by position."""
    flat = score.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    k = max(0, min(int(k), flat.numel()))
    if k == 0:
        return out.view_as(score)
    t = flat.kthvalue(k).values
    out = flat < t
    need = k - int(out.sum())
    if need > 0:
        out[(flat == t).nonzero().flatten()[:need]] = True
    return out.view_as(score)


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(score, dtype=torch.bool)
    k = max(0, min(int(k), score.shape[1]))
    if k:
        out.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return out


def lowest_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask with M - N pruned in every group of M consecutive columns; a final group of r < M columns
    keeps at most N."""
    rows, cols = score.shape
    out = torch.zeros_like(score, dtype=torch.bool)
    full = cols // m * m
    if full:
        g = score[:, :full].reshape(rows, -1, m)
        idx = torch.topk(g, m - n, dim=2, largest=False).indices
        out[:, :full] = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    if cols - full > n:
        out[:, full:] = lowest_per_row(score[:, full:], cols - full - n)
    return out


def prune_mask(score: torch.Tensor, frac: float, spec: Spec) -> torch.Tensor:
    """Which weights of one module to zero, by score (row / layer scope or N:M)."""
    nm = spec.nm
    if nm:
        return lowest_nm(score, *nm)
    if spec.scope == "row":
        return lowest_per_row(score, round(frac * score.shape[1]))
    return lowest(score, round(frac * score.numel()))


def _score(w: torch.Tensor, criterion: str, sq: torch.Tensor | None) -> torch.Tensor:
    s = w.detach().float().abs()
    if criterion == "wanda" and sq is not None:
        s = s * sq.to(s.device).sqrt()[None, :]
    return s


# ---- SparseGPT --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, frac: float, spec: Spec, keep: torch.Tensor | None = None,
              block: int = BLOCK, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune w [out, in] (float32) with the Hessian H = 2 X^T X / N [in, in]; returns (new weights, keep mask).
    With `keep` given, that mask is used instead of choosing one (replays) and only the updates are computed."""
    w = w.detach().float().clone()
    rows, cols = w.shape
    h = hessian.float().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0  # inputs that were always zero: no information, no coupling
    u = _inverse_cholesky(h, damp)
    nm = spec.nm
    chosen = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if chosen else keep.to(w.device).clone()
    if nm:
        block = max(nm[1], block // nm[1] * nm[1])
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        w1 = w[:, i1:i2].T.contiguous()  # [columns of the block, rows]: one column of w per contiguous row
        if chosen and not nm:
            score = (w1.pow(2) / d1[:, None].pow(2)).T
            if spec.scope == "row":
                gone = lowest_per_row(score, round(frac * i2) - round(frac * i1))
            else:
                gone = lowest(score, round(frac * rows * i2) - round(frac * rows * i1))
            keep[:, i1:i2] = ~gone
        scale = (~keep[:, i1:i2]).T.float() / d1[:, None]  # err_c = w_c * pruned_c / U_cc
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            if chosen and nm and i % nm[1] == 0:
                c, g = i1 + i, min(nm[1], i2 - i1 - i)
                if g > nm[0]:
                    score = (w1[i:i + g].pow(2) / d1[i:i + g, None].pow(2)).T
                    keep[:, c:c + g] = ~lowest_per_row(score, g - nm[0])
                    scale[i:i + g] = (~keep[:, c:c + g]).T.float() / d1[i:i + g, None]
            torch.mul(w1[i], scale[i], out=err1[i])
            # spread the error over the block's later columns (a rank-1 matmul: BLAS, not an elementwise op)
            w1[i:].addmm_(u1[i, i:, None], err1[i, None], alpha=-1)
        w[:, i1:i2] = (w1 * keep[:, i1:i2].T).T  # pruned entries exactly zero (w - w/d*d may not be)
        w[:, i2:] -= err1.T @ u[i1:i2, i2:]  # lazy batch update of the later blocks
    return w, keep


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, raising the damping until H is positive definite."""
    mean = h.diagonal().mean()
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper
        damp *= 10
    raise LopperError("the calibration Hessian of a layer is singular even after damping: use more "
                      "--calib-samples or --sparsity-criterion wanda")


# ---- the pass over a model --------------------------------------------------------------------------------------
@dataclass
class Result:
    """What `sparsify` did: the keep mask of every target ([out, in], True = kept) and the per-layer targets."""

    spec: Spec
    targets: list[Target]
    keep: dict[str, torch.Tensor]
    layer_targets: dict[int, float] = field(default_factory=dict)

    def achieved(self) -> dict[str, float]:
        return {t.name: 1 - self.keep[t.name].float().mean().item() for t in self.targets}

    def counts(self) -> tuple[int, int]:
        """(weights in the targets, weights zeroed by the masks)."""
        total = sum(self.keep[t.name].numel() for t in self.targets)
        return total, total - sum(int(self.keep[t.name].sum()) for t in self.targets)

    def plan_entry(self, calib: dict | None = None) -> dict:
        total, zeroed = self.counts()
        entry = {**self.spec.settings(), "masks": MASKS_FILE, "overall": round(zeroed / max(total, 1), 6)}
        if calib:
            entry["calibration"] = calib
        if self.spec.allocation == "owl":
            entry["layer_targets"] = {str(i): round(v, 6) for i, v in sorted(self.layer_targets.items())}
        entry["modules"] = {k: round(v, 6) for k, v in self.achieved().items()}
        return entry

    def report(self, model: nn.Module, adapter: Adapter) -> dict:
        total, zeroed = self.counts()
        per_layer = []
        for i in sorted({t.layer for t in self.targets}):
            ts = [t for t in self.targets if t.layer == i]
            n = sum(self.keep[t.name].numel() for t in ts)
            z = n - sum(int(self.keep[t.name].sum()) for t in ts)
            row = {"layer": i, "weights": n, "zeroed": z, "sparsity": round(z / n, 6)}
            if i in self.layer_targets:
                row["target"] = round(self.layer_targets[i], 6)
            per_layer.append(row)
        return {**self.spec.settings(), "overall": round(zeroed / max(total, 1), 6), "weights": total,
                "zeroed": zeroed, "modules": len(self.targets),
                "nonzero_params_non_embedding": nonzero_non_embedding(model, adapter), "per_layer": per_layer}

    def files(self) -> dict[str, bytes]:
        return {MASKS_FILE: pack_masks(self.keep)}


def nonzero_non_embedding(model: nn.Module, adapter: Adapter) -> int:
    """Nonzero entries of every parameter outside the embeddings and lm_head (tied ones once)."""
    embed = {id(p) for p in adapter.embedding_params()}
    params = {id(p): p for p in model.parameters() if id(p) not in embed}
    return sum(int(torch.count_nonzero(p)) for p in params.values())


@torch.no_grad()
def sparsify(model: nn.Module, adapter: Adapter, spec: Spec, windows: list[torch.Tensor] | None,
             masks: dict[str, torch.Tensor] | None = None, layer_targets: dict[int, float] | None = None,
             quiet: bool = False) -> Result:
    """Zero weights of `model` in place per `spec` (or per the given keep `masks`, from a replay)."""
    spec.check()
    tg = targets(model, adapter, spec.ignore)
    if not tg:
        raise LopperError(f"--sparsity-ignore {spec.ignore!r} leaves no Linear module in the layers to sparsify: "
                          "loosen it")
    if masks is not None:
        _check_masks(masks, tg)
    if spec.needs_calibration(masks is not None) and not windows:
        raise LopperError(f"--sparsity-criterion {spec.criterion} / --sparsity-allocation {spec.allocation} need "
                          "calibration text: the model needs tokenizer files")
    dense_sq = None
    if masks is None and (spec.allocation == "owl" or (spec.criterion == "wanda" and spec.scope == "global")):
        dense_sq = _input_sq(model, adapter, tg, windows, quiet)
    if layer_targets is None:
        layer_targets = owl_targets(tg, dense_sq, spec) if spec.allocation == "owl" and masks is None else \
            {i: spec.target for i in sorted({t.layer for t in tg})}
    if masks is not None and spec.criterion != "sparsegpt":
        keep = {t.name: masks[t.name] for t in tg}
    elif spec.scope == "global" and not spec.nm:
        keep = _global(tg, spec, dense_sq)
    elif spec.criterion == "magnitude":
        keep = {t.name: ~prune_mask(_score(t.weight(), "magnitude", None), layer_targets[t.layer], spec) for t in tg}
    else:
        keep = _sequential(model, adapter, tg, spec, layer_targets, windows, masks, quiet)
    for t in tg:  # idempotent where the pass already zeroed them
        w = t.weight()
        w.mul_(keep[t.name].to(w.device, w.dtype))
    result = Result(spec, tg, keep, layer_targets)
    total, zeroed = result.counts()
    log.info("sparsity: %d of %d weights in %d modules zeroed (%.4f, %s, %s)", zeroed, total, len(tg),
             zeroed / total, spec.pattern, spec.criterion)
    return result


def _global(tg: list[Target], spec: Spec, sq: dict | None) -> dict[str, torch.Tensor]:
    scores = [_score(t.weight(), spec.criterion, (sq or {}).get(id(t.module))).cpu() for t in tg]
    flat = torch.cat([s.reshape(-1) for s in scores])
    gone = lowest(flat, round(spec.target * flat.numel()))
    keep, start = {}, 0
    for t, s in zip(tg, scores):
        keep[t.name] = ~gone[start:start + s.numel()].view_as(s).to(t.module.weight.device)
        start += s.numel()
    return keep


def _input_sq(model: nn.Module, adapter: Adapter, tg: list[Target], windows, quiet: bool) -> dict[int, torch.Tensor]:
    """Sum over calibration tokens of x_j^2 per input channel of every target, dense model, one pass."""
    sq: dict[int, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].detach().float()
        sq[id(module)] = sq.get(id(module), 0) + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

    hooks = [t.module.register_forward_pre_hook(hook) for t in tg]
    device = next(model.parameters()).device
    try:
        for ids in tqdm(windows, desc="sparsity statistics", disable=quiet, leave=False):
            if adapter.is_encoder:
                model(input_ids=ids.to(device))
            else:
                model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return sq


def owl_targets(tg: list[Target], sq: dict[int, torch.Tensor], spec: Spec, lam: float = OWL_LAMBDA,
                m: float = OWL_M) -> dict[int, float]:
    """OWL: per-layer sparsity from each layer's outlier ratio of Wanda scores (see the module docstring)."""
    layers = sorted({t.layer for t in tg})
    ratio, size = [], []
    for i in layers:
        scores = torch.cat([_score(t.weight(), "wanda", sq.get(id(t.module))).reshape(-1)
                            for t in tg if t.layer == i])
        ratio.append((scores > m * scores.mean()).float().mean().item())
        size.append(scores.numel())
    r, n = torch.tensor(ratio, dtype=torch.float64), torch.tensor(size, dtype=torch.float64)
    spread = r.max() - r.min()
    keep = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    sparsity = -keep
    sparsity = sparsity - (sparsity * n).sum() / n.sum() + spec.target
    sparsity = sparsity.clamp(0.0, 0.99)
    return {i: float(s) for i, s in zip(layers, sparsity)}


def _sequential(model, adapter, tg, spec, layer_targets, windows, masks, quiet) -> dict[str, torch.Tensor]:
    """Wanda / SparseGPT, one layer at a time, each scored on the already-sparsified model's activations."""
    xs, layer_kwargs = capture_layer_inputs(model, adapter, windows)
    layers = list(adapter.layers())
    hessian = spec.criterion == "sparsegpt"
    last = max(t.layer for t in tg)
    keep: dict[str, torch.Tensor] = {}
    for i in tqdm(range(last + 1), desc=f"sparsity ({spec.criterion})", disable=quiet, leave=False):
        mods = [t for t in tg if t.layer == i]
        if mods:
            stats = _layer_stats(layers[i], i, mods, xs, layer_kwargs, hessian)
            for t in mods:
                w = t.weight()
                if hessian:
                    new, k = sparsegpt(w, stats[id(t.module)], layer_targets[i], spec,
                                       None if masks is None else masks[t.name])
                    w.copy_(new.to(w.dtype))
                    keep[t.name] = k
                else:
                    k = ~prune_mask(_score(w, "wanda", stats[id(t.module)]), layer_targets[i], spec)
                    w.mul_(k.to(w.dtype))
                    keep[t.name] = k
        if i < last:
            xs = [call_layer(layers[i], x, layer_kwargs[b][i]) for b, x in enumerate(xs)]
    return keep


def _layer_stats(layer, i, mods, xs, layer_kwargs, hessian: bool) -> dict[int, torch.Tensor]:
    """Per target of one layer: sum of x_j^2 (Wanda) or H = 2 X^T X / N (SparseGPT), over all windows. Modules
    called on the same tensor (q/k/v, gate/up) share one product."""
    acc: dict[int, torch.Tensor] = {}
    tokens: dict[int, int] = {}
    last: list = [None, None, 0]  # the input tensor seen last, its product, its tokens

    def hook(module, args):
        if args[0] is not last[0]:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            last[:] = [args[0], x.T @ x if hessian else x.pow(2).sum(0), x.shape[0]]
        acc[id(module)] = acc.get(id(module), 0) + last[1]
        tokens[id(module)] = tokens.get(id(module), 0) + last[2]

    hooks = [t.module.register_forward_pre_hook(hook) for t in mods]
    try:
        for b, x in enumerate(xs):
            call_layer(layer, x, layer_kwargs[b][i])
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    if hessian:
        return {k: 2 * v / tokens[k] for k, v in acc.items()}
    return acc


# ---- masks on disk ----------------------------------------------------------------------------------------------
def pack_masks(keep: dict[str, torch.Tensor]) -> bytes:
    """An .npz of np.packbits (big-endian bit order) of every flattened keep mask ([out, in], 1 = kept) plus a
    JSON header with the format and the shapes."""
    header = {"format": MASKS_FORMAT, "bit": "1 = weight kept", "layout": "[out, in] per module (Conv1D "
              "transposed), row-major, numpy.packbits", "shapes": {k: list(v.shape) for k, v in keep.items()}}
    arrays = {k: np.packbits(v.detach().cpu().numpy().astype(bool).reshape(-1)) for k, v in keep.items()}
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array(json.dumps(header)), **arrays)
    return buf.getvalue()


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["__header__"]))
            if header.get("format") != MASKS_FORMAT:
                raise ValueError(f"format {header.get('format')!r}")
            out = {}
            for name, shape in header["shapes"].items():
                bits = np.unpackbits(z[name], count=math.prod(shape)).astype(bool)
                out[name] = torch.from_numpy(bits.reshape(shape))
            return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LopperError(f"{path} is not a lopper masks file ({e}): prune again to write one")


def _check_masks(masks: dict[str, torch.Tensor], tg: list[Target]) -> None:
    for t in tg:
        shape = tuple(t.weight().shape)
        if t.name not in masks or tuple(masks[t.name].shape) != shape:
            got = tuple(masks[t.name].shape) if t.name in masks else "none"
            raise LopperError(f"the recorded sparsity masks do not fit this model ({t.name}: mask {got}, weight "
                              f"{shape}): replay the plan on the model it was made for")
    extra = set(masks) - {t.name for t in tg}
    if extra:
        raise LopperError(f"the recorded sparsity masks name modules this model lacks ({sorted(extra)[0]}): replay "
                          "the plan on the model it was made for")


# ---- the api.prune step -----------------------------------------------------------------------------------------
def for_prune(args, plan, model: nn.Module, adapter: Adapter, windows) -> Result | None:
    """Sparsify the (already cut) model per the plan it replays if that records sparsity, else per args (a replayed
    structured plan may get new sparsity); records the result in plan.sparsity. None when no sparsity is asked."""
    masks, layer_targets = None, None
    entry = getattr(plan, "sparsity", None) if args.plan else None
    if entry:
        spec = Spec.from_settings(entry)
        if entry.get("masks"):
            path = Path(args.plan).parent / entry["masks"]
            if not path.is_file():
                raise LopperError(f"the plan's sparsity masks {path} are missing: copy {entry['masks']} beside the "
                                  "plan, or remove the plan's \"masks\" entry to choose them again")
            masks = load_masks(path)
            if entry.get("layer_targets") is not None:
                layer_targets = {int(i): v for i, v in entry["layer_targets"].items()}
        _warn_calibration(entry, args, spec, masks is not None)
    else:
        spec = Spec.from_args(args)
        if not spec.active:
            return None
    result = sparsify(model, adapter, spec, windows, masks, layer_targets, quiet=args.quiet)
    calib = {"calib": args.calib or "built-in", "calib_samples": args.calib_samples, "seq_len": args.seq_len} \
        if spec.needs_calibration(masks is not None) else None
    plan.sparsity = result.plan_entry(calib)
    return result


def _warn_calibration(entry: dict, args, spec: Spec, have_masks: bool) -> None:
    rec = entry.get("calibration")
    now = {"calib": args.calib or "built-in", "calib_samples": args.calib_samples, "seq_len": args.seq_len}
    if rec and spec.needs_calibration(have_masks) and rec != now:
        log.warning("the plan's sparsity was computed with calibration %s, this replay uses %s: SparseGPT's weight "
                    "updates will differ", rec, now)


# ---- loading with semi-structured (2:4) kernels -----------------------------------------------------------------
def is_2_4(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of every row (w: [out, in])."""
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module, adapter: Adapter) -> list[str]:
    """Replace the weight of every 2:4-sparse nn.Linear in the layers by torch's semi-structured sparse tensor
    (cuSPARSELt / CUTLASS kernels). Needs CUDA: raises LopperError on CPU. Modules whose shape or dtype the
    kernels refuse stay dense (logged). Returns the converted module names."""
    if not torch.cuda.is_available():
        raise LopperError("semi_structured=True needs CUDA (torch's 2:4 sparse kernels have no CPU version): load "
                          "without it on this machine")
    if next(model.parameters()).device.type != "cuda":
        raise LopperError("semi_structured=True needs the model on the GPU: pass device='cuda'")
    from torch.sparse import to_sparse_semi_structured

    names = {id(m): n for n, m in model.named_modules()}
    done, refused = [], []
    for layer in adapter.layers():
        for m in layer.modules():
            if type(m) is not nn.Linear or not is_2_4(m.weight):
                continue
            try:
                m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
                done.append(names[id(m)])
            except (RuntimeError, ValueError, NotImplementedError) as e:
                refused.append(f"{names[id(m)]} ({' '.join(str(e).split())[:120]})")
    if refused:
        log.warning("kept dense (refused by the 2:4 kernels): %s", "; ".join(refused[:5]))
    if not done:
        raise LopperError("no Linear weight of this model is 2:4 sparse in a shape and dtype the kernels take: "
                          "prune with --sparsity-pattern 2:4, or load without semi_structured")
    return done
