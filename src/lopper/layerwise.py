"""Running a model one layer at a time: the hidden states entering the first layer and the arguments every layer is
called with (captured once), then each layer called on its own. The one place for the sequential scheme that the
repair (repair.py) and Wanda / SparseGPT (sparsity/apply.py) use: each layer sees the already-changed model's activations.
"""
from __future__ import annotations

import torch
from torch import nn

from .arch import Adapter


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor]):
    """Per window: the hidden states entering layer 0 and the keyword arguments (masks, rotary embeddings)
    every layer is called with; these depend on the tokens and the layer type, not on the weights."""
    layers = adapter.layers()
    hidden, kwargs = [], []
    calls: list[dict] = []

    def grab(module, args, kw):
        calls.append({"x": args[0] if args else kw["hidden_states"], "args": args[1:],
                      "kw": {k: v for k, v in kw.items() if k != "hidden_states"}})
        if module is layers[-1]:
            raise _Stop

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            calls.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False) if not adapter.is_encoder else model(
                    input_ids=ids.to(device))
            except _Stop:
                pass
            hidden.append(calls[0]["x"])
            kwargs.append([(c["args"], c["kw"]) for c in calls])
    finally:
        for h in hooks:
            h.remove()
    return hidden, kwargs


def call_layer(layer, x, call):
    """The layer's output hidden states for input x [B, L, hidden] and one recorded call (args, kwargs)."""
    args, kw = call
    y = layer(x, *args, **kw)
    return y[0] if isinstance(y, tuple) else y
