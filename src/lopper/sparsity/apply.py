"""The pass over a model: the candidate modules, OWL's per-layer fractions, the magnitude / global / sequential
(Wanda, SparseGPT) passes, and the step `lopper prune` runs after the cut."""
from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..arch import Adapter
from ..errors import LopperError
from ..layerwise import call_layer, capture_layer_inputs, resident
from .criteria import lowest, prune_mask, score, sparsegpt
from .masks import MASKS_FILE, Packed, load_masks
from .settings import Spec

log = logging.getLogger("lopper")

LINEAR = (nn.Linear, Conv1D)
OWL_LAMBDA = 0.08
OWL_M = 5.0


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


# ---- the pass over a model --------------------------------------------------------------------------------------
@dataclass
class Result:
    """What `sparsify` did: the keep mask of every target ([out, in], True = kept, bit-packed), the per-layer targets
    and the nonzero parameters outside the embeddings after it."""

    spec: Spec
    targets: list[Target]
    packed: Packed
    layer_targets: dict[int, float] = field(default_factory=dict)
    nonzero: int = 0

    @property
    def keep(self) -> dict[str, torch.Tensor]:
        """Every mask unpacked (bool tensors: 8x the packed size)."""
        return {t.name: self.packed.get(t.name) for t in self.targets}

    def achieved(self) -> dict[str, float]:
        return {t.name: 1 - self.packed.kept[t.name] / self.packed.numel(t.name) for t in self.targets}

    def counts(self, layer: int | None = None) -> tuple[int, int]:
        """(weights in the targets, weights zeroed by the masks), of one layer or all."""
        names = [t.name for t in self.targets if layer is None or t.layer == layer]
        total = sum(self.packed.numel(n) for n in names)
        return total, total - sum(self.packed.kept[n] for n in names)

    def plan_entry(self, calib: dict | None = None) -> dict:
        total, zeroed = self.counts()
        entry = {**self.spec.settings(), "masks": MASKS_FILE, "overall": round(zeroed / max(total, 1), 6)}
        if calib:
            entry["calibration"] = calib
        if self.spec.allocation == "owl":
            entry["layer_targets"] = {str(i): round(v, 6) for i, v in sorted(self.layer_targets.items())}
        entry["modules"] = {k: round(v, 6) for k, v in self.achieved().items()}
        return entry

    def report(self) -> dict:
        total, zeroed = self.counts()
        per_layer = []
        for i in sorted({t.layer for t in self.targets}):
            n, z = self.counts(i)
            row = {"layer": i, "weights": n, "zeroed": z, "sparsity": round(z / n, 6)}
            if i in self.layer_targets:
                row["target"] = round(self.layer_targets[i], 6)
            per_layer.append(row)
        return {**self.spec.settings(), "overall": round(zeroed / max(total, 1), 6), "weights": total,
                "zeroed": zeroed, "modules": len(self.targets), "nonzero_params_non_embedding": self.nonzero,
                "per_layer": per_layer}

    def files(self) -> dict[str, bytes]:
        return {MASKS_FILE: self.packed.file()}


def nonzero_non_embedding(model: nn.Module, adapter: Adapter, known: dict[int, int] | None = None) -> int:
    """Nonzero entries of every parameter outside the embeddings and lm_head (tied ones once); a streamed model's
    layers are read one at a time, except those whose count is `known` ({layer index: nonzero entries})."""
    embed = {id(p) for p in adapter.embedding_params()}
    total, seen = 0, set(embed)
    for i, layer in enumerate(adapter.layers()):
        if known is not None and i in known:
            total += known[i]
        else:
            with resident(layer):
                total += _nonzero(layer.parameters(), seen)
        seen.update(id(p) for p in layer.parameters())
    return total + _nonzero((p for p in model.parameters() if not p.is_meta), seen)


def _nonzero(params, skip: set[int]) -> int:
    """Nonzero entries of `params` (each once) whose id is not in `skip`."""
    unique = {id(p): p for p in params if id(p) not in skip}
    return sum(int(torch.count_nonzero(p)) for p in unique.values())


@torch.no_grad()
def sparsify(model: nn.Module, adapter: Adapter, spec: Spec, windows: list[torch.Tensor] | None,
             masks: dict[str, torch.Tensor] | None = None, layer_targets: dict[int, float] | None = None,
             quiet: bool = False, after: Callable[[int], None] | None = None) -> Result:
    """Zero weights of `model` in place per `spec` (or per the given keep `masks`, from a replay). Layer by layer,
    each held resident for its step, so a streamed model (layerwise.py) has one layer in memory at a time;
    `after(i)` is called while layer i is still resident and final (the streamed prune writes it out then)."""
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
    layers = list(adapter.layers())
    embed = {id(p) for p in adapter.embedding_params()}
    counted: dict[int, int] = {}  # nonzero entries of each layer the pass changed, counted while it is resident

    def finished(i: int) -> None:
        counted[i] = _nonzero(layers[i].parameters(), embed)
        if after is not None:
            after(i)

    dense_sq = None
    if masks is None and (spec.allocation == "owl" or (spec.criterion == "wanda" and spec.scope == "global")):
        dense_sq = input_sq(model, adapter, tg, windows, quiet)
    if layer_targets is None:
        layer_targets = owl_targets(tg, dense_sq, spec, layers=layers) \
            if spec.allocation == "owl" and masks is None else {i: spec.target for i in sorted({t.layer for t in tg})}
    if masks is not None and spec.criterion != "sparsegpt":
        keep = _each_layer(layers, tg, lambda t: masks[t.name], finished)
    elif spec.scope == "global" and not spec.nm:
        chosen = _global(layers, tg, spec, dense_sq)
        keep = _each_layer(layers, tg, lambda t: chosen[t.name], finished)
    elif spec.criterion == "magnitude":
        keep = _each_layer(layers, tg, lambda t: ~prune_mask(score(t.weight(), "magnitude", None),
                                                              layer_targets[t.layer], spec), finished)
    else:
        keep = _sequential(model, adapter, tg, spec, layer_targets, windows, masks, quiet, finished)
    result = Result(spec, tg, keep, layer_targets, nonzero_non_embedding(model, adapter, counted))
    total, zeroed = result.counts()
    log.info("sparsity: %d of %d weights in %d modules zeroed (%.4f, %s, %s)", zeroed, total, len(tg),
             zeroed / total, spec.pattern, spec.criterion)
    return result


def _each_layer(layers, tg: list[Target], mask_of, after) -> Packed:
    """Zero every target by its keep mask `mask_of(target)` ([out, in], True = kept), one layer resident at a time."""
    keep = Packed()
    for i in sorted({t.layer for t in tg}):
        with resident(layers[i]):
            for t in (t for t in tg if t.layer == i):
                w = t.weight()
                k = mask_of(t).to(w.device)
                w.mul_(k.to(w.dtype))
                keep.add(t.name, k)
            after(i)
    return keep


def _global(layers, tg: list[Target], spec: Spec, sq: dict | None) -> dict[str, torch.Tensor]:
    """One threshold over every target's scores (all of them at once: the streamed prune refuses this scope)."""
    scores = []
    for t in tg:
        with resident(layers[t.layer]):
            scores.append(score(t.weight(), spec.criterion, (sq or {}).get(id(t.module))).cpu())
    flat = torch.cat([s.reshape(-1) for s in scores])
    gone = lowest(flat, round(spec.target * flat.numel()))
    keep, start = {}, 0
    for t, s in zip(tg, scores):
        keep[t.name] = ~gone[start:start + s.numel()].view_as(s)
        start += s.numel()
    return keep


def input_sq(model: nn.Module, adapter: Adapter, tg: list[Target], windows, quiet: bool) -> dict[int, torch.Tensor]:
    """Sum over calibration tokens of x_j^2 per input channel of every target, dense model, one layer at a time."""
    sq: dict[int, torch.Tensor] = {}

    def hook(module, args):
        x = args[0].detach().float()
        sq[id(module)] = sq.get(id(module), 0) + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

    xs, layer_kwargs = capture_layer_inputs(model, adapter, windows)
    layers = list(adapter.layers())
    for i in tqdm(range(max(t.layer for t in tg) + 1), desc="sparsity statistics", disable=quiet, leave=False):
        hooks = [t.module.register_forward_pre_hook(hook) for t in tg if t.layer == i]
        try:
            with resident(layers[i]):
                xs = [call_layer(layers[i], x, layer_kwargs[b][i]) for b, x in enumerate(xs)]
        finally:
            for h in hooks:
                h.remove()
    return sq


def owl_targets(tg: list[Target], sq: dict[int, torch.Tensor], spec: Spec, lam: float = OWL_LAMBDA,
                m: float = OWL_M, layers: list[nn.Module] | None = None) -> dict[int, float]:
    """OWL: per-layer sparsity from each layer's outlier ratio of Wanda scores (see the module docstring). With
    `layers` (a streamed model's), each is held resident while its scores are read."""
    ids = sorted({t.layer for t in tg})
    ratio, size = [], []
    for i in ids:
        with resident(layers[i]) if layers is not None else nullcontext():
            scores = torch.cat([score(t.weight(), "wanda", sq.get(id(t.module))).reshape(-1)
                                for t in tg if t.layer == i])
        ratio.append((scores > m * scores.mean()).float().mean().item())
        size.append(scores.numel())
    r, n = torch.tensor(ratio, dtype=torch.float64), torch.tensor(size, dtype=torch.float64)
    spread = r.max() - r.min()
    keep = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    sparsity = -keep
    sparsity = sparsity - (sparsity * n).sum() / n.sum() + spec.target
    sparsity = sparsity.clamp(0.0, 0.99)
    return {i: float(s) for i, s in zip(ids, sparsity)}


def _sequential(model, adapter, tg, spec, layer_targets, windows, masks, quiet, after) -> Packed:
    """Wanda / SparseGPT, one layer at a time, each scored on the already-sparsified model's activations."""
    xs, layer_kwargs = capture_layer_inputs(model, adapter, windows)
    layers = list(adapter.layers())
    hessian = spec.criterion == "sparsegpt"
    last = max(t.layer for t in tg)
    keep = Packed()
    for i in tqdm(range(last + 1), desc=f"sparsity ({spec.criterion})", disable=quiet, leave=False):
        mods = [t for t in tg if t.layer == i]
        with resident(layers[i]):
            if mods:
                stats = _layer_stats(layers[i], i, mods, xs, layer_kwargs, hessian)
                for t in mods:
                    w = t.weight()
                    if hessian:
                        new, k = sparsegpt(w, stats.pop(id(t.module)), layer_targets[i], spec,
                                           None if masks is None else masks[t.name])
                        w.copy_(new.to(w.dtype))
                    else:
                        k = ~prune_mask(score(w, "wanda", stats.pop(id(t.module))), layer_targets[i], spec)
                        w.mul_(k.to(w.dtype))
                    keep.add(t.name, k)
            if i < last:
                xs = [call_layer(layers[i], x, layer_kwargs[b][i]) for b, x in enumerate(xs)]
            if mods:
                after(i)
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


# ---- the api.prune step -----------------------------------------------------------------------------------------
def for_prune(args, plan, model: nn.Module, adapter: Adapter, windows, after=None) -> Result | None:
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
    result = sparsify(model, adapter, spec, windows, masks, layer_targets, quiet=args.quiet, after=after)
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
