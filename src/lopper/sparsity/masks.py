"""The masks on disk (bit-packed in lopper_masks.npz, so a replayed plan re-applies the same zeros) and 2:4 weights
loaded as torch semi-structured sparse tensors."""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..arch import Adapter
from ..errors import LopperError

log = logging.getLogger("lopper")

MASKS_FILE = "lopper_masks.npz"
MASKS_FORMAT = "lopper-masks/1"


# ---- masks on disk ----------------------------------------------------------------------------------------------
class Packed:
    """Keep masks ([out, in], True = kept) bit-packed as they are made: one bit a weight, so a streamed 7B prune
    holds 0.8 GB of masks where bool tensors would be 6.5 GB."""

    def __init__(self):
        self.bits: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.kept: dict[str, int] = {}

    def add(self, name: str, mask: torch.Tensor) -> None:
        m = mask.detach().cpu().bool()
        self.bits[name] = np.packbits(m.numpy().reshape(-1))
        self.shapes[name] = tuple(m.shape)
        self.kept[name] = int(m.sum())

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    def get(self, name: str) -> torch.Tensor:
        bits = np.unpackbits(self.bits[name], count=self.numel(name)).astype(bool)
        return torch.from_numpy(bits.reshape(self.shapes[name]))

    def file(self) -> bytes:
        """An .npz of np.packbits (big-endian bit order) of every flattened mask plus a JSON header with the
        format and the shapes."""
        header = {"format": MASKS_FORMAT, "bit": "1 = weight kept", "layout": "[out, in] per module (Conv1D "
                  "transposed), row-major, numpy.packbits", "shapes": {k: list(v) for k, v in self.shapes.items()}}
        buf = io.BytesIO()
        np.savez(buf, __header__=np.array(json.dumps(header)), **self.bits)
        return buf.getvalue()


def pack_masks(keep: dict[str, torch.Tensor]) -> bytes:
    """The masks file of `keep` ({name: [out, in] keep mask}); `Packed.file` gives the layout."""
    packed = Packed()
    for name, mask in keep.items():
        packed.add(name, mask)
    return packed.file()


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
