"""The plan: which units each structure keeps, as indices into the *original* model. Saved as JSON beside the weights,
so any cut can be inspected before it happens (`lopper plan`) and replayed (`lopper prune --plan`).

Layout (indices are sorted, 0-based, in the unpruned model's numbering):
    {"format": "lopper-plan/1", "model": {signature}, "layers": [kept layers],
     "hidden": [kept hidden channels],
     "per_layer": {"<layer>": {"heads": [...], "kv_heads": [...], "mlp": [...]}},
     "meta": {how it was chosen}, "sparsity": {optional: settings, per-module fractions zeroed; sparsity/}}
Per-layer lists may differ in length between layers (non-uniform widths); later formats add keys, never rename.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .arch import Adapter
from .errors import LopperError

FORMAT = "lopper-plan/1"


@dataclass
class Plan:
    model: dict
    layers: list[int]
    hidden: list[int]
    per_layer: dict[int, dict[str, list[int]]]
    meta: dict = field(default_factory=dict)
    sparsity: dict | None = None  # unstructured / N:M sparsity after the cut (sparsity/); optional key

    def to_json(self) -> str:
        per = {str(i): v for i, v in sorted(self.per_layer.items())}
        body = {"format": FORMAT, "model": self.model, "layers": self.layers, "hidden": self.hidden,
                "per_layer": per, "meta": self.meta}
        if self.sparsity is not None:
            body["sparsity"] = self.sparsity
        return _compact_json(body)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            d = json.loads(text)
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            return cls(model=d["model"], layers=d["layers"], hidden=d["hidden"],
                       per_layer={int(k): v for k, v in d["per_layer"].items()}, meta=d.get("meta", {}),
                       sparsity=d.get("sparsity"))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise LopperError(f"{source} is not a lopper plan ({e}): write one with `lopper plan MODEL --out PLAN.json`")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise LopperError(f"plan file {p} does not exist: write one with `lopper plan MODEL --out {p}`")
        return cls.from_json(p.read_text(), source=str(p))

    def widths(self) -> dict[int, dict[str, int]]:
        """Kept count per kept layer and structure."""
        return {i: {k: len(v) for k, v in self.per_layer[i].items()} for i in self.layers}

    def uniform_widths(self) -> dict[str, int] | None:
        """The widths shared by every kept layer, or None if they differ."""
        per = list(self.widths().values())
        out = {}
        for key in per[0]:
            counts = {w[key] for w in per if w[key]}  # 0: a layer without this structure (a dense layer of an MoE)
            if len(counts) > 1:
                return None
            out[key] = counts.pop() if counts else 0
        return {**out, "hidden": len(self.hidden)}


def _compact_json(obj) -> str:
    """Indented JSON with every list of numbers on one line: readable, and diffable line by structure."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(str(k))}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        if isinstance(o, list) and any(isinstance(x, (dict, list)) for x in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(x, ind + 1)}" for x in o) + f"\n{pad}]"
        return json.dumps(o)
    return enc(obj, 0) + "\n"


def signature(adapter: Adapter) -> dict:
    """What a plan must match to be replayed on a model: its type and every original width."""
    layers = adapter.layers()
    sig = {"model_type": adapter.config.model_type, "num_layers": len(layers), "hidden": adapter.hidden_size(),
           "head_dim": adapter.head_dim(), "vocab": adapter.embeddings()[0].weight.shape[0]}
    sig.update({k: [adapter.layer_widths(l)[k] for l in layers] for k in adapter.layer_widths(layers[0])})
    return sig


def identity_plan(adapter: Adapter) -> Plan:
    """The plan that removes nothing."""
    layers = adapter.layers()
    per = {i: {k: list(range(n)) for k, n in adapter.layer_widths(l).items()} for i, l in enumerate(layers)}
    return Plan(model=signature(adapter), layers=list(range(len(layers))), hidden=list(range(adapter.hidden_size())),
                per_layer=per)


def validate(plan: Plan, adapter: Adapter) -> None:
    """Raise LopperError if the plan does not fit this model or would empty a structure."""
    sig = signature(adapter)
    if plan.model != sig:
        diff = ", ".join(f"{k}: plan {plan.model.get(k)!r} vs model {sig[k]!r}" for k in sig
                         if plan.model.get(k) != sig[k])
        raise LopperError(f"the plan was made for another model ({_short(diff)}): make a new plan for this model "
                          "with `lopper plan`")
    _check_subset("layers", plan.layers, sig["num_layers"])
    _check_subset("hidden", plan.hidden, sig["hidden"])
    group = None
    for i in plan.layers:
        if i not in plan.per_layer:
            raise LopperError(f"the plan keeps layer {i} but has no per_layer entry for it: add one or drop the layer")
        entry = plan.per_layer[i]
        for key in sig:
            if isinstance(sig[key], list):
                if key not in entry:
                    raise LopperError(f"the plan's layer {i} lacks {key!r}: list the kept {key} indices")
                if sig[key][i] == 0 and entry[key]:
                    raise LopperError(f"the plan's layer {i} keeps {key} that this layer does not have: give []")
                if sig[key][i]:
                    _check_subset(f"layer {i} {key}", entry[key], sig[key][i])
        if "kv_heads" in entry:
            group = sig["heads"][i] // sig["kv_heads"][i]
            _check_groups(i, entry["heads"], entry["kv_heads"], group)
        if sig.get("experts", [0] * (i + 1))[i]:
            _check_experts(i, entry, sig["expert_mlp"][i] // sig["experts"][i],
                           getattr(adapter.config, "num_experts_per_tok", 1))


def _check_subset(what: str, idx: list[int], n: int) -> None:
    if not idx:
        raise LopperError(f"the plan removes every unit of {what}: keep at least one")
    if list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
        raise LopperError(f"the plan's {what} must be sorted unique indices in [0, {n}): fix or regenerate the plan")


def _check_groups(layer: int, heads: list[int], kv: list[int], group: int) -> None:
    """Grouped-query attention maps query head h to KV head h // group; each kept group keeps the same count."""
    counts = {g: 0 for g in kv}
    for h in heads:
        if h // group not in counts:
            raise LopperError(f"layer {layer} keeps query head {h} but drops its KV head {h // group}: keep both or "
                              "neither")
    for h in heads:
        counts[h // group] += 1
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise LopperError(f"layer {layer} keeps unequal query heads per KV group {counts}: grouped-query attention "
                          "needs the same count in every kept group")


def _check_experts(layer: int, entry: dict, per_expert: int, top_k: int) -> None:
    """Expert channels are numbered e * per_expert + j: each kept expert keeps the same count (experts are stacked
    in one [E, ...] tensor), removed experts keep none, and the router still has top_k experts to pick."""
    if len(entry["experts"]) < top_k:
        raise LopperError(f"layer {layer} keeps {len(entry['experts'])} experts but the router picks {top_k} per "
                          "token: keep at least that many")
    counts = {e: 0 for e in entry["experts"]}
    for u in entry["expert_mlp"]:
        if u // per_expert not in counts:
            raise LopperError(f"layer {layer} keeps channels of expert {u // per_expert}, which it removes: keep both "
                              "or neither")
        counts[u // per_expert] += 1
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise LopperError(f"layer {layer} keeps unequal channel counts per expert {counts}: every kept expert needs "
                          "the same count")


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n] + " ..."
