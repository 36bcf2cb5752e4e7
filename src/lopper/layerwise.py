"""Running a model one layer at a time: the hidden states entering the first layer and the arguments every layer is
called with (captured once, without computing any layer), then each layer called on its own. The one place for the
sequential scheme that importance statistics (importance.py), the repair (repair.py), Wanda / SparseGPT
(sparsity/apply.py) and the layer-streamed prune (stream.py) use: each layer sees the already-changed model's
activations.

A streamed model keeps its layers' weights on the meta device; `resident(layer)` reads one layer's tensors from the
checkpoint for the length of a block, and a forward hook does the same around any call, so code written for a
resident model runs unchanged on a streamed one, one layer in memory at a time (the scheme of SparseGPT and
llm-compressor; accelerate's `set_module_tensor_to_device` moves the tensors).
"""
from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .arch import Adapter


class _Stop(Exception):
    pass


# layer -> (reads its tensors: {name: tensor} at the compute dtype and device, {name: original meta tensor})
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DEPTH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> open resident() blocks and calls
_TUPLE_OUT: dict[type, bool] = {}  # layer class -> whether it returns a tuple (GPT-2, OPT, BERT) or a tensor
_STUBBED: weakref.WeakSet = weakref.WeakSet()  # layers whose forward is stubbed out: nothing to read


def stream_layer(layer: nn.Module, read: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Make `layer` (a decoder layer, or an untied embedding or head) streamed: its parameters go to the meta device
    and come back from `read()` while it is resident (a `resident` block, or any call of the module)."""
    shapes = {name: torch.empty_like(p, device="meta") for name, p in layer.named_parameters()}
    _SOURCES[layer] = (read, shapes)
    release(layer)
    layer.register_forward_pre_hook(lambda module, args: _enter(module))
    layer.register_forward_hook(lambda module, args, out: _leave(module))


def is_streamed(layer: nn.Module) -> bool:
    return layer in _SOURCES


def streamed_outside(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The model's streamed modules that are not decoder layers (an untied embedding and head)."""
    inside = {id(m) for layer in adapter.layers() for m in layer.modules()}
    return [m for m in model.modules() if m in _SOURCES and id(m) not in inside]


def pin(module: nn.Module) -> None:
    """Resident for good: read once, never released (the source is dropped), so changes made to it stay."""
    if module in _SOURCES:
        _load(module)
        retire(module)


def retire(layer: nn.Module) -> None:
    """The layer's weights were changed and written out: never read the original checkpoint for it again (a later
    call then fails on meta tensors instead of silently computing with the unchanged weights)."""
    _SOURCES.pop(layer, None)
    _DEPTH.pop(layer, None)


def release(layer: nn.Module) -> None:
    """Back to the meta device, with the original shapes (surgery on the meta skeleton cuts those)."""
    if layer in _SOURCES:
        for name, meta in _SOURCES[layer][1].items():
            owner, _, attr = name.rpartition(".")
            module = layer.get_submodule(owner)
            module._parameters[attr] = nn.Parameter(meta, requires_grad=module._parameters[attr].requires_grad)
        _trim()


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). Without it the many medium-sized arrays of each
    layer's repair leave the heap larger after every layer, and a streamed run's resident memory grew with depth
    (8-layer run: 0.63 -> 0.75 GB between layers, against a flat 0.52 GB with it)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


_LIBC = _libc()


@contextmanager
def resident(layer: nn.Module):
    """The layer's weights in memory for the block (nothing to do for a layer that is not streamed)."""
    _enter(layer)
    try:
        yield layer
    finally:
        _leave(layer)


def _enter(layer: nn.Module) -> None:
    if layer not in _SOURCES or layer in _STUBBED:
        return
    depth = _DEPTH.get(layer, 0)
    if depth == 0:
        _load(layer)
    _DEPTH[layer] = depth + 1


def _load(module: nn.Module) -> None:
    for name, t in _SOURCES[module][0]().items():
        set_module_tensor_to_device(module, name, t.device, value=t)


def _leave(layer: nn.Module) -> None:
    if layer not in _SOURCES or layer in _STUBBED:
        return
    _DEPTH[layer] -= 1
    if _DEPTH[layer] == 0:
        release(layer)


@contextmanager
def _stubbed(layers, stub):
    """Replace every layer's forward by stub(index, *args, **kwargs) for the block: the model's own code before and
    after its layers runs as usual (embeddings, masks, rotary tables; final norm, head) while no layer computes."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = lambda *a, i=i, **kw: stub(i, *a, **kw)
        _STUBBED.add(layer)
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            _STUBBED.discard(layer)
            if old is None:
                del layer.forward
            else:
                layer.forward = old


def _device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters() if not p.is_meta)


def outside_resident(model: nn.Module, adapter: Adapter) -> ExitStack:
    """A block holding the streamed embedding and head in memory (an empty one for a resident model)."""
    held = ExitStack()
    for m in streamed_outside(model, adapter):
        held.enter_context(resident(m))
    return held


def run_model(model: nn.Module, adapter: Adapter, ids: torch.Tensor):
    """The model's forward on token ids [B, L], without a KV cache for decoders (encoders take no use_cache)."""
    ids = ids.to(_device(model))
    return model(input_ids=ids) if adapter.is_encoder else model(input_ids=ids, use_cache=False)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor]):
    """Per window: the hidden states entering layer 0 and the (args, kwargs) every layer is called with (masks,
    rotary embeddings); these depend on the tokens and the layer type, not on the weights, so they are recorded
    with every layer's forward stubbed out and none computed."""
    layers = list(adapter.layers())
    hidden, kwargs = [], []
    calls: list[dict] = []

    def record(i, *args, **kw):
        x = args[0] if args else kw.pop("hidden_states")
        calls.append({"x": x, "args": args[1:], "kw": kw})
        if i == len(layers) - 1:
            raise _Stop
        return (x,) if _TUPLE_OUT.get(type(layers[i]), False) else x

    with _stubbed(layers, record), outside_resident(model, adapter):
        for ids in batches:
            calls.clear()
            try:
                run_model(model, adapter, ids)
            except _Stop:
                pass
            hidden.append(calls[0]["x"])
            kwargs.append([(c["args"], c["kw"]) for c in calls])
    return hidden, kwargs


@torch.no_grad()
def run_tail(model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], finals: list[torch.Tensor]) -> None:
    """Run what follows the layers (final norm, head, pooler) as the model's forward would on the hidden states
    `finals` [1, L, hidden] leaving the last layer, one per window; for the hooks registered on those modules."""
    with outside_resident(model, adapter):  # read once for all windows
        for ids, y in zip(batches, finals):
            with layers_skipped(model, adapter, y):
                run_model(model, adapter, ids)


@contextmanager
def layers_skipped(model: nn.Module, adapter: Adapter, y: torch.Tensor):
    """For the block, the model's forward skips its layers and hands `y` [B, L, hidden] to what follows them (final
    norm, head, pooler), as if the last layer had returned it; the streamed embedding and head are resident."""
    layers = list(adapter.layers())

    def give(i, *args, **kw):
        x = y if i == 0 else (args[0] if args else kw["hidden_states"])
        return (x,) if _TUPLE_OUT.get(type(layers[i]), False) else x

    with _stubbed(layers, give), outside_resident(model, adapter):
        yield


def embed(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering layer 0 for token ids [B, L], with the autograd graph back to the embedding when
    gradients are on; the caller holds a streamed embedding resident (`outside_resident`)."""
    layers = list(adapter.layers())
    first = []

    def record(i, *args, **kw):
        first.append(args[0] if args else kw["hidden_states"])
        raise _Stop

    with _stubbed(layers, record):
        try:
            run_model(model, adapter, ids)
        except _Stop:
            pass
    return first[0]


def call_layer(layer, x, call):
    """The layer's output hidden states for input x [B, L, hidden] and one recorded call (args, kwargs)."""
    args, kw = call
    with resident(layer):
        y = layer(x, *args, **kw)
    _TUPLE_OUT[type(layer)] = isinstance(y, tuple)
    return y[0] if isinstance(y, tuple) else y
