"""GGUF out: a pruned model written as one .gguf file that llama.cpp (and Ollama, LM Studio) loads, in the weight
types of the GGUF it was pruned from.

The input GGUF is the template. Every metadata key is copied as llama.cpp's converter wrote it (vocabulary, merges,
token types, special tokens, chat template, RoPE and norm settings), and only the keys that state the model's shape
change: block_count, feed_forward_length, head_count, head_count_kv, embedding_length and file_type. Tensors take
llama.cpp's names from gguf's own name map (the map transformers' GGUF reader inverts) and llama.cpp's layout:
convert_hf_to_gguf.py permutes Llama's q/k rows into its interleaved RoPE order, which transformers' reader undoes,
so reading the written file back through transformers checks the whole path (tests/test_gguf_out.py).

Weight types: each matrix takes the type its counterpart had in the input (SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1
layers, a Q8_0 token embedding), or `--gguf-type` for all matrices; vectors (norms, biases) stay F32 as llama.cpp
keeps them. gguf's quantizers (numpy ports of ggml's reference code) write F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 and
Q4_0. K- and i-quants (Q4_K_M, IQ4_XS, ...) have none there: their importance-weighted search is llama.cpp's C code,
so an input in one of them is written in the legacy type with the fewest bits per weight above its own (Q4_K:
4.5 bits -> Q4_1, 5.0), and `llama-quantize OUT.gguf Q4_K_M` requantizes it. A block type needs rows that are whole
blocks (32 values), so `prune --out FILE.gguf` keeps widths in multiples of 32; a row that is not (a width given by
hand) is written in F16, as llama.cpp's converter does, and the report says which.

Written here: uniform cuts of the families whose llama.cpp layout is the checkpoint's own up to the q/k permutation
(llama, qwen2, qwen3). Per-layer widths (llama.cpp's `deci` layout) and other families are refused by name.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import LopperError
from .io import is_gguf
from .options import Options, arg_field

log = logging.getLogger("lopper")

ARCHES = ("llama", "qwen2", "qwen3")  # llama.cpp architectures written (general.architecture of the template)
PERMUTED_QK = ("llama",)  # convert_hf_to_gguf.py's LlamaModel.permute: rows of q/k in interleaved RoPE order
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what gguf.quants can write
SHAPE_KEYS = ("block_count", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
              "embedding_length")


@dataclass(kw_only=True)
class GgufOptions(Options):
    """GGUF output (--out FILE.gguf)"""

    gguf_type: str = arg_field("auto", "weight type of the matrices in a .gguf output: auto (each matrix in its type "
                               "in the input GGUF; K- and i-quants as the next legacy type up) or one of "
                               + ", ".join(TYPES), choices=("auto", *TYPES))


def check_source(template: str, what: str = "the model") -> None:
    """Refuse early (before any work) what cannot become a GGUF: a source that is not a GGUF file of ARCHES."""
    if not is_gguf(template) or not Path(template).is_file():
        raise LopperError(f"--out *.gguf copies the tokenizer and settings from the input GGUF, and {what} was read "
                          f"from {template or 'a folder'}: prune the .gguf file itself, or write a folder and convert "
                          "it with llama.cpp's convert_hf_to_gguf.py")
    arch = _reader(template).fields["general.architecture"].contents()
    if arch not in ARCHES:
        raise LopperError(f"writing GGUF is not supported for llama.cpp architecture {arch!r} yet (lopper writes "
                          f"{', '.join(ARCHES)}): write a folder (--out DIR) instead")


def check_output(out: str | Path, force: bool, source: str) -> Path:
    """Fail before any work if the output file is taken, is a folder, or is the input."""
    out = Path(out)
    if out.resolve() == Path(source).resolve():
        raise LopperError(f"--out {out} is the input model: write the pruned model to another file")
    if out.is_dir():
        raise LopperError(f"--out {out} is a folder: name a .gguf file, or a folder without the .gguf suffix")
    if out.exists() and not force:
        raise LopperError(f"--out {out} already exists: choose another file or pass --force to replace it")
    return out


def beside(out: str | Path, name: str) -> Path:
    """smol-25.gguf, lopper_report.json -> smol-25.lopper_report.json: the files a folder output holds inside."""
    return Path(out).with_suffix("." + name)


def block_size(template: str, gguf_type: str) -> int:
    """Kept widths must be multiples of this for every matrix to be whole blocks of its type."""
    from gguf import GGML_QUANT_SIZES

    kinds = {_writable(t.tensor_type) for t in _reader(template).tensors if len(t.shape) >= 2}
    if gguf_type != "auto":
        kinds = {_kind(gguf_type)}
    return math.lcm(*(GGML_QUANT_SIZES[k][0] for k in kinds))


def write(model, adapter, template: str, out: str | Path, gguf_type: str = "auto") -> dict:
    """Write `model` (cut, uniform widths) as the GGUF file `out` (a temporary sibling, then renamed), with the
    template's metadata; returns what was written: types by count, F16 fallbacks, bytes."""
    import gguf

    reader = _reader(template)
    arch = reader.fields["general.architecture"].contents()
    widths = _uniform(adapter)
    names = _names(model, arch)
    roles = _template_roles(reader)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.lopper-tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _copy_metadata(reader, writer, arch, widths)
        written, fallback = Counter(), []
        produced = set()
        for hf_name, t in model.state_dict().items():
            name = names.get(hf_name)
            if name is None or (name == "output.weight" and "output.weight" not in roles):
                continue  # tied head: llama.cpp reuses token_embd when the template has no output.weight
            data = _layout(t, name, arch, widths)
            kind = _kind(gguf_type) if data.ndim >= 2 and gguf_type != "auto" else roles.get(_role(name))
            kind = _writable(kind) if data.ndim >= 2 and kind is not None else gguf.GGMLQuantizationType.F32
            if data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
                fallback.append(name)
                kind = gguf.GGMLQuantizationType.F16
            writer.add_tensor(name, _encode(data, kind), raw_dtype=kind)
            written[kind.name] += 1
            produced.add(name)
        for t in reader.tensors:  # e.g. rope_freqs.weight: not a model parameter, carried as it was
            if t.name not in produced and not t.name.startswith("blk.") and t.name != "output.weight":
                writer.add_tensor(t.name, t.data, raw_shape=list(reversed([int(n) for n in t.shape])),
                                  raw_dtype=t.tensor_type)
                written[t.tensor_type.name] += 1
        writer.add_file_type(_file_type(written))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if fallback:
        log.warning("%d matrices have rows that are not whole blocks of their type and were written in F16 (e.g. "
                    "%s): keep widths in multiples of 32", len(fallback), fallback[0])
    log.info("wrote %s: %s, %.2f MB", out, ", ".join(f"{n} {k}" for k, n in written.most_common()),
             out.stat().st_size / 1e6)
    return {"types": dict(written), "f16_fallback": fallback, "bytes": out.stat().st_size, "template": str(template)}


def _reader(path: str):
    """The template's GGUFReader, parsed once per file version: parsing a real file's metadata takes seconds (SmolLM2's
    49,152-token vocabulary: 2 s), and a prune reads it three times (checks, block size, write)."""
    stat = Path(path).stat()
    return _parsed(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parsed(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def _kind(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _bits(kind) -> float:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    return 8 * size / block


def _writable(kind):
    """`kind` if gguf can write it, else the writable type with the fewest bits per weight above its own (a K-quant's
    scales per 16 or 32 values make it better than the legacy type of equal size: Q4_K, 4.5 bits, is nearer Q4_1's
    5.0 than Q4_0's 4.5)."""
    if kind.name in TYPES:
        return kind
    above = [_kind(n) for n in TYPES if _bits(_kind(n)) > _bits(kind)]
    return min(above, key=_bits)


def _uniform(adapter) -> dict:
    """The one set of widths every layer has (heads, kv_heads, mlp, head_dim, hidden); refuses per-layer widths."""
    widths = [adapter.layer_widths(layer) for layer in adapter.layers()]
    if any(w != widths[0] for w in widths) or not widths[0].get("heads") or not widths[0].get("mlp"):
        raise LopperError("the cut has per-layer widths or layers without attention or MLP, which need llama.cpp's "
                          "deci layout, not written yet: prune with --allocation uniform, or write a folder "
                          "(--out DIR) and `lopper export --format nemotron-nas`")
    return {**widths[0], "hidden": adapter.hidden_size(), "head_dim": adapter.head_dim(),
            "layers": len(widths)}


def _names(model, arch: str) -> dict[str, str]:
    """state-dict name -> GGUF tensor name, from gguf's name map as transformers' GGUF reader builds it."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    return {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor(), arch).items()}


def _role(name: str) -> str:
    """blk.7.ffn_down.weight -> ffn_down.weight: a tensor's part in every block."""
    return name.split(".", 2)[2] if name.startswith("blk.") else name


def _template_roles(reader) -> dict:
    """role -> the type most of the template's tensors in that role have."""
    kinds: dict[str, Counter] = {}
    for t in reader.tensors:
        kinds.setdefault(_role(t.name), Counter())[t.tensor_type] += 1
    return {role: c.most_common(1)[0][0] for role, c in kinds.items()}


def _layout(t: torch.Tensor, name: str, arch: str, w: dict) -> np.ndarray:
    """A parameter as llama.cpp stores it: float32 numpy, q/k rows permuted for Llama's interleaved RoPE
    ([heads, 2, d/2, in] -> [heads, d/2, 2, in])."""
    a = t.detach().float().cpu().numpy()
    if arch in PERMUTED_QK and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = w["heads"] if "attn_q" in name else w["kv_heads"]
        a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    return np.ascontiguousarray(a)


def _encode(a: np.ndarray, kind) -> np.ndarray:
    from gguf import GGMLQuantizationType as T, quants

    if kind == T.F32:
        return a
    if kind == T.F16:
        return a.astype(np.float16)
    return quants.quantize(a, kind)


def _copy_metadata(reader, writer, arch: str, w: dict) -> None:
    """Every key of the template but GGUF's own counters, the architecture (the writer adds it) and file_type (set
    once the types are known); the shape keys from the cut model."""
    from gguf import GGUFValueType as V

    shape = {f"{arch}.block_count": w["layers"], f"{arch}.feed_forward_length": w["mlp"],
             f"{arch}.attention.head_count": w["heads"], f"{arch}.attention.head_count_kv": w["kv_heads"],
             f"{arch}.embedding_length": w["hidden"]}
    if w["heads"] * w["head_dim"] != w["hidden"]:  # llama.cpp's head size is hidden / heads unless these say it
        shape.update({f"{arch}.attention.key_length": w["head_dim"], f"{arch}.attention.value_length": w["head_dim"]})
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        value = shape.pop(key, None)
        if value is None:
            value = field.contents()
        elif vtype == V.ARRAY:
            raise LopperError(f"{key} holds one value per layer in the input GGUF, which lopper does not write yet")
        writer.add_key_value(key, value, vtype, sub_type=field.types[-1] if vtype == V.ARRAY else None)
    for key, value in shape.items():
        writer.add_uint32(key, value)


def _file_type(written: Counter) -> int:
    """general.file_type: llama.cpp's name for the type most matrices have (MOSTLY_Q4_1, ...)."""
    from gguf import LlamaFileType

    main = next((k for k, _ in written.most_common() if k != "F32"), "F32")
    return LlamaFileType.ALL_F32 if main == "F32" else LlamaFileType[f"MOSTLY_{main}"]
