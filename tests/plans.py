"""Random valid plans for the property tests of every family (hypothesis `data` draws)."""
from __future__ import annotations

from hypothesis import strategies as st

from lopper.plan import Plan, identity_plan


def kept(data, n: int, label: str, strict: bool, least: int = 1) -> list[int]:
    """A sorted subset of range(n) of at least `least` (>= 1) elements; a proper subset when `strict`."""
    size = data.draw(st.integers(least, n - 1 if strict else n), label=f"{label} count")
    return sorted(data.draw(st.permutations(range(n)), label=label)[:size])


def draw_heads(data, plan: Plan, i: int, groups_mode: str, q_mode: str) -> None:
    """Kept KV groups and query heads of layer i under the GQA rule: kept query heads belong to kept groups and every
    kept group keeps the same number of them. Modes: 'all' keeps all, 'strict' drops at least one (KV groups / query
    heads in each kept group), 'any' keeps a random non-empty subset."""
    sig, entry = plan.model, plan.per_layer[i]
    n_heads = sig["heads"][i]

    def subset(n, mode, label):
        return list(range(n)) if mode == "all" else kept(data, n, label, strict=mode == "strict" and n > 1)

    if "kv_heads" not in entry:  # BERT: any subset of heads
        mode = "strict" if "strict" in (groups_mode, q_mode) else "all" if groups_mode == q_mode == "all" else "any"
        entry["heads"] = subset(n_heads, mode, f"layer {i} heads")
        return
    n_kv = sig["kv_heads"][i]
    group = n_heads // n_kv
    groups = subset(n_kv, groups_mode, f"layer {i} kv groups")
    hi = group - 1 if q_mode == "strict" and group > 1 else group
    count = group if q_mode == "all" else data.draw(st.integers(1, hi), label=f"layer {i} query heads per group")
    heads = []
    for g in groups:
        heads += [g * group + j for j in data.draw(st.permutations(range(group)), label=f"layer {i} group {g}")[:count]]
    entry["kv_heads"], entry["heads"] = groups, sorted(heads)


def draw_plan(data, adapter, kind: str, hidden: bool | None = None) -> Plan:
    """A random valid plan of `kind` that removes at least one unit of that structure (of every structure for 'all'):
    every kept layer gets a random subset, and the first kept layer always loses something. `hidden`: whether
    kind "all" also cuts hidden channels (default: not for encoders, whose LayerNorm is not mask-exact there)."""
    plan = identity_plan(adapter)
    sig = plan.model
    if kind in ("layers", "all"):
        plan.layers = kept(data, sig["num_layers"], "layers", strict=True)
    for n, i in enumerate(plan.layers):
        must = n == 0
        if kind == "heads":
            draw_heads(data, plan, i, "all", "strict" if must else "any")
        elif kind == "kv":
            draw_heads(data, plan, i, "strict" if must else "any", "all")
        elif kind == "all":
            several_groups = sig.get("kv_heads", [1] * (i + 1))[i] > 1
            draw_heads(data, plan, i, "strict" if must and several_groups else "any",
                       "strict" if must and not several_groups else "any")
        if kind in ("mlp", "all"):
            plan.per_layer[i]["mlp"] = kept(data, sig["mlp"][i], f"layer {i} mlp", strict=must)
    if hidden is None:
        hidden = not adapter.is_encoder
    if kind == "hidden" or (kind == "all" and hidden):
        # at least half the channels: a token whose few kept channels are all near zero makes the next RMSNorm
        # amplify float32 rounding (not a surgery error) past the tolerance
        plan.hidden = kept(data, sig["hidden"], "hidden", strict=True, least=max(1, sig["hidden"] // 2))
    return plan


def uniform_plan(adapter, edits: dict) -> Plan:
    """The identity plan with the same kept indices in every layer (`edits`: layers, hidden, heads, kv_heads, mlp)."""
    plan = identity_plan(adapter)
    plan.layers = edits.get("layers", plan.layers)
    plan.hidden = edits.get("hidden", plan.hidden)
    for entry in plan.per_layer.values():
        for key in ("heads", "kv_heads", "mlp"):
            if key in edits and key in entry:
                entry[key] = edits[key]
    return plan
