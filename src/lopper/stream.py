"""The layer-streamed prune: peak memory independent of depth (the sequential scheme of SparseGPT and
llm-compressor).

The model is built on the meta device; the embeddings, final norm and head are read from the checkpoint and stay
in memory; each decoder layer is read from the memory-mapped safetensors only while it is used (layerwise.py) and
released after. The passes are the in-memory prune's own functions, which run one layer at a time:
1. calibration statistics (`importance.collect`) and width scores (`importance.width_scores`): one read per layer;
2. the plan, from every layer's statistics;
3. per kept layer, in order: the repair (`repair.repair` on the already-cut model's hidden states, with the
   unpruned stream beside it), then the cut (`surgery.cut_layer`), then the write of its tensors to their own
   shard; then `surgery.apply` on the meta skeleton rewrites the config and cuts the resident tensors, which go to
   the last shard;
4. `reopen`: the written layers are streamed again from their shards; with sparsity, `sparsify_written`
   sparsifies them in order on the cut model's activations (sparsity.for_prune), each written over its shard;
   with --eval-text, the output's perplexity is measured one layer at a time (evaluate.perplexity).
Peak: embeddings + head + one or two layers + the calibration hidden states. The result is the in-memory prune's
(tests/test_stream.py: same plan, same logits).

Streams: Hugging Face folders of safetensors whose tensor names are the model's own (what transformers 5 saves for
dense families), layer metrics bi/angular, every width metric (Fisher: gradient.py's streamed backward, one layer
at a time), --repair lsq/none, sparsity.
Not yet: GGUF files, checkpoints whose names transformers converts at load (fused experts), SLEB,
--params-search loss, --target-speedup, --calib self (sampling reads every layer once per token),
--sparsity-scope global (one threshold over every weight); `Selection.not_streamed` names them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import adapter_class
from .errors import LopperError
from .io import empty_model, is_gguf, load_tokenizer, model_class, read_config, resolve_dtype
from .layerwise import pin, release, resident, retire, stream_layer, streamed_outside
from .plan import Plan
from .surgery import apply, cut_layer, removed_cuts

log = logging.getLogger("lopper")
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A safetensors checkpoint: which file holds each tensor name. Reads opens the file for the read only, so
    the mapped pages of a layer are let go with it."""

    def __init__(self, folder: str):
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}
        else:
            raise LopperError(f"--stream reads safetensors, and {folder} has neither model.safetensors nor {INDEX}: "
                              "prune it without --stream")

    def read(self, names: dict[str, str], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
        """{key: tensor} for {key: checkpoint name}, at `dtype` on `device` (copies, never views of the map)."""
        out, by_file = {}, {}
        for key, name in names.items():
            by_file.setdefault(self.files[name], []).append((key, name))
        for path, items in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for key, name in items:
                    t = f.get_tensor(name)
                    out[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)
        return out


def layers_prefix(model, adapter) -> str:
    """The state-dict name of the decoder layers' ModuleList, e.g. 'model.layers'."""
    layers = adapter.layers()
    return next(name for name, m in model.named_modules() if m is layers)


def load_streamed(source: str, device: str, dtype_name: str):
    """(model, tokenizer or None, adapter) with the layers streamed from `source`: only the tensors outside the
    layers are read now."""
    config = read_config(source)
    if is_gguf(source):
        raise LopperError(f"--stream reads safetensors, and {source} is a GGUF file: prune it with --stream off")
    if getattr(config, "lopper_layout", None):
        raise LopperError(f"{source} was saved with a lopper layout, which --stream cannot read yet: use --stream off")
    dtype = resolve_dtype(dtype_name, device)
    model = empty_model(model_class(config), config, dtype)
    adapter = adapter_class(config.model_type)(model)
    ckpt = Checkpoint(source)
    names = [n for n, _ in model.named_parameters()]  # tied parameters once
    other = [n for n in names if n not in ckpt.files]
    if other:
        raise LopperError(f"--stream reads tensors under the model's own names, and {source} has no tensor "
                          f"{other[0]} ({len(other)} such: its checkpoint uses a layout that transformers converts "
                          "at load, e.g. per-expert tensors): prune it with --stream off")
    prefix = layers_prefix(model, adapter) + "."
    ends = untied_ends(adapter)
    lazy = {name + ".": m for name, m in model.named_modules() if any(m is e for e in ends)}
    lazy.update({f"{prefix}{i}.": layer for i, layer in enumerate(adapter.layers())})
    now = {n: n for n in names if not any(n.startswith(k) for k in lazy)}  # final norm, small embeddings
    for name, t in ckpt.read(now, dtype, device).items():
        set_module_tensor_to_device(model, name, device, value=t)
    for name, _ in model.named_buffers():
        set_module_tensor_to_device(model, name, device)
    model.tie_weights()  # a tied head shares the embedding just read
    for own, module in lazy.items():
        keys = {n[len(own):]: n for n in names if n.startswith(own)}
        stream_layer(module, lambda keys=keys: ckpt.read(keys, dtype, device))
    model.eval()
    return model, load_tokenizer(source), adapter


def untied_ends(adapter) -> list:
    """The embeddings and head that share no parameter with another module: read only while used (a 32K x 4096
    embedding and head are 1 GB in float32). Tied ones stay in memory (re-tying after every read is not worth it)."""
    ends = [*adapter.embeddings(), *([adapter.lm_head()] if adapter.lm_head() is not None else [])]
    owners: dict[int, int] = {}
    for m in adapter.model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [m for m in ends if all(owners[id(p)] == 1 for p in m.parameters())]


class Shards:
    """Writes the output's safetensors one shard at a time, named as transformers names them, and the index."""

    def __init__(self, folder: Path, count: int, dtype: torch.dtype | None):
        self.folder, self.count, self.dtype = folder, count, dtype
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{k + 1:05d}-of-{self.count:05d}.safetensors"
        cast = saved(tensors, self.dtype)
        save_file(cast, self.folder / name, metadata={"format": "pt"})
        self.weight_map.update({n: name for n in cast})
        self.total += sum(t.numel() * t.element_size() for t in cast.values())

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def cut_and_write(model, adapter, plan: Plan, folder: Path, dtype: torch.dtype | None, repair=None) -> bool:
    """Pass 3 of the module docstring: `repair(after)` (run_repair with its options) or None; returns whether the
    output is a standard checkpoint. Writes weights and config.json into `folder`."""
    layers, prefix = list(adapter.layers()), layers_prefix(model, adapter)
    hidden_ratio = adapter.hidden_size() / len(plan.hidden)
    shards = Shards(folder, len(plan.layers) + 1, dtype)
    ends = streamed_outside(model, adapter)
    if hidden_ratio != 1:  # the repair zeroes their removed hidden channels in place: keep them
        for m in ends:
            pin(m)
    done: set[int] = set()

    def write(i: int) -> None:
        layer = layers[i]
        cut_layer(adapter, layer, removed_cuts(adapter, replace(plan, layers=[i])), hidden_ratio)
        j = plan.layers.index(i)
        shards.write(j, {f"{prefix}.{j}.{n}": t for n, t in layer.state_dict().items()})
        release(layer)
        retire(layer)
        done.add(i)

    if repair is not None:
        repair(after=write)
    for i in plan.layers:
        if i not in done:
            with resident(layers[i]):
                write(i)
    for m in ends:
        pin(m)
    standard = apply(model, adapter, plan)  # the layers are meta now: shapes and config; the rest is cut for real
    inside = prefix + "."
    rest, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not name.startswith(inside) and id(t) not in seen:
            rest[name] = t.detach()
            seen.add(id(t))
    shards.write(len(plan.layers), rest)
    shards.finish()
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    return standard


def reopen(model, adapter, folder: Path) -> None:
    """After `cut_and_write`: the skeleton's layers (cut shapes, meta) are streamed again, from the shards just
    written to `folder`, so that the output can be sparsified and measured one layer at a time."""
    ckpt, prefix = Checkpoint(folder), layers_prefix(model, adapter)
    held = next(p for p in model.parameters() if not p.is_meta)
    for j, layer in enumerate(adapter.layers()):
        keys = {n: f"{prefix}.{j}.{n}" for n, _ in layer.named_parameters()}
        stream_layer(layer, lambda keys=keys: ckpt.read(keys, held.dtype, held.device))


def sparsify_written(model, adapter, folder: Path, dtype: torch.dtype | None, run):
    """Pass 4, sparsity, on a `reopen`ed skeleton: `run(after)` sparsifies the layers one at a time on the cut
    model's own activations (sparsity.for_prune, as in memory), and `after(i)` writes layer i over its shard.
    Returns run's result. A checkpoint saved in a narrower dtype than the compute one is sparsified from the saved
    (rounded) weights."""
    shard_of = Checkpoint(folder).files
    prefix, layers = layers_prefix(model, adapter), list(adapter.layers())

    def after(i: int) -> None:
        tensors = {f"{prefix}.{i}.{n}": t for n, t in layers[i].state_dict().items()}
        rewrite(shard_of[next(iter(tensors))], tensors, dtype)

    return run(after)


def rewrite(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Replace the safetensors file `path` by `tensors` (cast to `dtype`), through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(saved(tensors, dtype), tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def saved(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The tensors as written: floating ones cast to the checkpoint's dtype (None: as they are), contiguous."""
    return {n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
            for n, t in tensors.items()}
