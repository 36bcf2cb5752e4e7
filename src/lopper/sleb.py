"""SLEB (Song et al. 2024): remove transformer blocks greedily, each step the block whose removal gives the lowest
calibration loss (log-perplexity) of the model as it then is.

No copy of the model is made: a removed block is skipped by giving the block instance a forward that returns its
input (in the block's own output format), the same function surgery.mask's passthrough computes but without running
the block; the instance attribute is deleted afterwards, so the model is left as it was.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter
from .errors import LopperError

SAMPLES = 8  # calibration windows per candidate evaluation (SLEB: "a few"; each step runs one forward per candidate)


class Sleb:
    """drop_fn for select.Target: (drop, lo, hi) -> the `drop` layers of lo..hi-1 that greedy SLEB removes. The greedy
    sequence is computed once per (lo, hi) and extended as needed, so asking for fewer layers costs nothing more."""

    def __init__(self, model: nn.Module, adapter: Adapter, windows: list[torch.Tensor], samples: int = SAMPLES,
                 quiet: bool = False):
        if adapter.is_encoder or adapter.lm_head() is None:
            raise LopperError("--layer-metric sleb needs a causal LM loss, which this model (an encoder) has not: use "
                              "--layer-metric bi or angular")
        if not windows:
            raise LopperError("--layer-metric sleb needs calibration windows")
        self.model, self.adapter, self.windows = model, adapter, windows[:samples]
        self.quiet = quiet
        self.history: dict[tuple[int, int], list[tuple[int, float]]] = {}  # (lo, hi) -> [(layer removed, loss)]
        self._tuple_len: int | None = None

    def __call__(self, drop: int, lo: int, hi: int) -> list[int]:
        seq = self.history.setdefault((lo, hi), [])
        with tqdm(total=drop, initial=min(len(seq), drop), desc="sleb", disable=self.quiet, leave=False) as bar:
            while len(seq) < drop:
                gone = [i for i, _ in seq]
                cands = [i for i in range(lo, hi) if i not in gone]
                if not cands:
                    raise LopperError(f"SLEB cannot remove {drop} layers from layers {lo}..{hi - 1}")
                losses = {i: self.loss(gone + [i]) for i in cands}
                best = min(cands, key=lambda i: losses[i])
                seq.append((best, losses[best]))
                bar.update(1)
        return sorted(i for i, _ in seq[:drop])

    @torch.no_grad()
    def loss(self, skip: list[int]) -> float:
        """Mean next-token cross-entropy over the windows with the layers `skip` passed through."""
        device = next(self.model.parameters()).device
        total = 0.0
        with self.skipped(skip):
            for ids in self.windows:
                ids = ids.to(device)
                logits = self.model(input_ids=ids, use_cache=False).logits
                total += torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
        return total / len(self.windows)

    @contextmanager
    def skipped(self, skip: list[int]):
        layers = self.adapter.layers()
        if skip and self._tuple_len is None:
            self._tuple_len = self._probe(layers[0])
        n = self._tuple_len

        def passthrough(*args, **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            return x if n == 0 else (x,) + (None,) * (n - 1)

        try:
            for i in skip:
                layers[i].forward = passthrough
            yield
        finally:
            for i in skip:
                layers[i].__dict__.pop("forward", None)

    @torch.no_grad()
    def _probe(self, layer: nn.Module) -> int:
        """0 if the block returns a tensor, else the length of the tuple it returns."""
        seen = []
        h = layer.register_forward_hook(lambda m, a, out: seen.append(len(out) if isinstance(out, tuple) else 0))
        try:
            self.model(input_ids=self.windows[0][:, :8].to(next(self.model.parameters()).device), use_cache=False)
        finally:
            h.remove()
        return seen[0]
