"""`lopper export`: rewrite a pruned model in a layout that serving engines read with per-layer widths.

nemotron-nas is the layout of NVIDIA's DeciLM / Nemotron-NAS models (Llama-3.1-Nemotron-51B,
Llama-3.3-Nemotron-Super-49B; Bercovich et al. 2024, "Puzzle"), in which every decoder block has its own widths:

    config.block_configs[i] = {"attention": {"n_heads_in_group": g, "no_op": false, "replace_with_linear": false},
                               "ffn": {"ffn_mult": m, "no_op": false, "replace_with_linear": false}}

block i has num_attention_heads / g KV heads and an MLP of width roundup(int(2 m hidden / 3), 256); no_op (with g or m
null, as llama.cpp reads it) drops the attention or the MLP, and its norm, from the block (the MLP only together with
the attention, see _pad_mlp). The tensors keep Llama's names. vLLM, SGLang and TensorRT-LLM (DeciLMForCausalLM),
llama.cpp's GGUF converter and MLX-LM read it; transformers needs NVIDIA's code (`trust_remote_code=True`, named in
the config's auto_map), so `lopper.load()` cannot open the export: keep the lopper folder for that.

The layout's rules (one query-head count for every block, KV heads dividing it, MLP widths multiples of 256) are met
by zero padding, which changes nothing the model computes: a padded MLP channel has zero gate/up rows and a zero
down_proj column (silu(0) * 0 = 0); a padded query head has zero q rows and a zero o_proj column, so whatever it
attends to is multiplied by zero; a padded KV group serves only padded heads. The padding costs parameters (reported;
ref-llama at 25% removed with global widths: 2.3%). `--round-to 256` avoids it in the MLPs only where they are many
multiples of 256 wide: on ref-llama (1024) it forces heads out instead and perplexity goes from 111 to 158.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from .version import __version__
from .errors import LopperError
from .evaluate import count_params
from . import gguf_out
from .options import arg_field, existing, resolve_args, set_quiet
from .plan import Plan
from .io import (PLAN_FILE, checkpoint_dtype, add_legacy_config_keys, check_output, copy_side_files, is_gguf, load_model,
                 read_config, staged)

log = logging.getLogger("lopper")
FORMATS = ("nemotron-nas", "gguf")
FAMILIES = ("llama", "mistral", "qwen2")
# NVIDIA's configuration and modeling code for the layout, referenced as "repo--module.Class" (transformers fetches
# it with trust_remote_code=True); nothing of it is copied here.
REMOTE_CODE = "nvidia/Llama-3_3-Nemotron-Super-49B-v1"
EXPORT_REPORT = "lopper_export.json"


@dataclass(kw_only=True)
class ExportArgs(gguf_out.GgufOptions):
    """Model and layout"""

    model: str = arg_field("", "model folder to export (standard, or saved by lopper with per-layer widths)",
                      positional=True)
    out: str = arg_field("", "output folder, or .gguf file (written atomically)", required=True)
    format: str = arg_field("nemotron-nas", "layout: nemotron-nas (NVIDIA DeciLM block_configs, widths per layer; read by "
                       "vLLM, SGLang, TensorRT-LLM and llama.cpp's converter), or gguf (one file for llama.cpp, "
                       "with the tokenizer and settings of --template)", choices=FORMATS)
    template: str = arg_field("", "with --format gguf: the GGUF file the model was pruned from (default: the source "
                              "named in the folder's plan)")
    force: bool = arg_field(False, "replace an existing output folder")
    quiet: bool = arg_field(False, "no logs")

    def check_group(self) -> None:
        if not self.model:
            raise LopperError("no model given: pass the pruned model folder to export")
        if not self.out:
            raise LopperError("no --out given: name the output folder")
        existing("template", self.template, "the GGUF file the model was pruned from")


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The MLP width a block's ffn_mult stands for: int(2 m hidden / 3) rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden / 3)
    return -(-n // 256) * 256


def ffn_mult(width: int, hidden: int) -> float:
    """The ffn_mult (6 decimals, as the configs write it) whose ffn_width is `width`, a multiple of 256."""
    m = round(width * 3 / (2 * hidden), 6)
    assert ffn_width(m, hidden) == width, (width, hidden, m)
    return m


def export(args: ExportArgs | None = None, /, **kwargs) -> dict:
    """Load `args.model` (a lopper output or standard folder of FAMILIES), write it in `args.format` to `args.out`
    (temporary folder, then rename); returns the report also written as lopper_export.json."""
    args = resolve_args(ExportArgs, args, kwargs)
    args.check()
    if args.format == "gguf":
        return export_gguf(args)
    check_output(args.out, args.force, args.model)  # before the load: fail fast on a taken folder or a wrong family
    source = read_config(args.model)
    _check_family(source)
    set_quiet(args.quiet)
    dtype = checkpoint_dtype(source)
    model, tok, adapter = load_model(args.model, "cpu", str(dtype).removeprefix("torch.") if dtype else "float32")
    return save_export(model, tok, adapter, args)


def export_gguf(args: ExportArgs) -> dict:
    """A pruned folder (uniform widths) as one .gguf file, with the metadata of the GGUF it was pruned from."""
    template = args.template or _plan_source(args.model)
    gguf_out.check_output(args.out, args.force, args.model)
    gguf_out.check_source(template, what=args.model)
    set_quiet(args.quiet)
    model, _, adapter = load_model(args.model, "cpu", "float32")
    written = gguf_out.write(model, adapter, template, args.out, args.gguf_type)
    return {"lopper_version": __version__, "source": args.model, "format": "gguf", **written}


def _plan_source(folder: str) -> str:
    plan = Path(folder) / PLAN_FILE
    source = Plan.load(plan).meta.get("source", "") if plan.is_file() else ""
    if not is_gguf(source):
        raise LopperError(f"{folder} was not pruned from a GGUF file (its plan names {source or 'no source'}): give "
                          "--template FILE.gguf, the GGUF of the same model before pruning")
    return source


def save_export(model, tok, adapter, args: ExportArgs) -> dict:
    """Write a loaded `model` (read from args.model, perhaps cut further in memory) as `args.out` in the layout;
    returns the report also written as lopper_export.json."""
    config, state, blocks = nemotron_nas(model, adapter)
    before = count_params(model, adapter)["params"]
    after = sum(t.numel() for t in state.values())
    report = {"lopper_version": __version__, "source": args.model, "format": args.format,
              "params_before": before, "params_after": after, "padding_params": after - before, "blocks": blocks,
              "args": asdict(args)}
    with staged(args.out, args.force, args.model) as tmp:
        write_state(state, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        add_legacy_config_keys(tmp / "config.json")
        copy_side_files(args.model, tmp, tok)
        for name in (PLAN_FILE, "generation_config.json"):
            if (Path(args.model) / name).is_file():
                shutil.copy2(Path(args.model) / name, tmp / name)
        (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    log.info("params: %s -> %s (%s of padding)", f"{before:,}", f"{after:,}", f"{after - before:,}")
    return report


def write_state(state: dict[str, torch.Tensor], folder: Path, max_shard: str = "5GB") -> None:
    """safetensors shards and, when there are several, the index that transformers and vLLM read."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard)
    for file, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, folder / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def nemotron_nas(model, adapter) -> tuple[dict, dict[str, torch.Tensor], list[dict]]:
    """(config.json as a dict, the tensors by name, one summary per block) of a `model` of FAMILIES with any
    per-layer widths, padded to the layout's rules."""
    c = adapter.config
    _check_family(c)
    hidden, d = adapter.hidden_size(), adapter.head_dim()
    widths = [adapter.layer_widths(layer) for layer in adapter.layers()]
    n_heads = _query_heads(widths, hidden, d, c.num_attention_heads)
    names = {id(m): n for n, m in model.named_modules()}
    state = dict(model.state_dict())
    if getattr(c, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    bias = any(adapter.attention(layer).q_proj.bias is not None for layer in adapter.layers())
    blocks, summary = [], []
    with torch.no_grad():
        for layer, w in zip(adapter.layers(), widths):
            attn = _pad_attention(adapter, layer, w, n_heads, state, names, bias)
            mlp = _pad_mlp(adapter, layer, w, state, names, hidden, keep=not attn["no_op"])
            blocks.append({"attention": attn, "ffn": mlp})
            summary.append({"heads": w["heads"], "kv_heads": w["kv_heads"], "mlp": w["mlp"],
                            "kv_heads_written": 0 if attn["no_op"] else n_heads // attn["n_heads_in_group"],
                            "mlp_written": 0 if mlp["no_op"] else ffn_width(mlp["ffn_mult"], hidden)})
    config = c.to_dict()
    for k in ("num_key_value_heads", "intermediate_size", "lopper_layout", "auto_map", "layer_types", "sliding_window",
              "use_sliding_window", "max_window_layers"):
        config.pop(k, None)
    config.update(attention_bias=bias, architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", block_configs=blocks,
                  hidden_size=hidden, head_dim=d, num_attention_heads=n_heads, num_hidden_layers=len(blocks),
                  rms_norm_eps=adapter.final_norms()[0].variance_epsilon,
                  auto_map={"AutoConfig": f"{REMOTE_CODE}--configuration_decilm.DeciLMConfig",
                            "AutoModelForCausalLM": f"{REMOTE_CODE}--modeling_decilm.DeciLMForCausalLM"})
    return config, state, summary


def _check_family(config) -> None:
    """Llama, and the families that are Llama plus what the layout can carry: Mistral whose sliding window never
    binds, Qwen2 (q/k/v biases; o_proj gets a zero one) without sliding-window layers."""
    if config.model_type not in FAMILIES:
        raise LopperError(f"--format nemotron-nas writes {', '.join(FAMILIES)} models and this one is "
                          f"{config.model_type!r}: keep the lopper folder (lopper.load())")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < config.max_position_embeddings:
        raise LopperError(f"this {config.model_type} model attends within a sliding window of {window} tokens "
                          f"(of {config.max_position_embeddings}), which the nemotron-nas layout cannot say: keep the "
                          "lopper folder (lopper.load())")


def _query_heads(widths: list[dict], hidden: int, d: int, most: int) -> int:
    """The one query-head count H of every block. Readers that derive head_dim from hidden / H (llama.cpp's
    converter, transformers' remote DeciLM code) need H = hidden / head_dim, which fits every block unless hidden
    channels were cut; otherwise the H up to the config's that needs the least padding (vLLM reads head_dim)."""
    need = [(w["kv_heads"], w["heads"] // w["kv_heads"]) for w in widths if w["heads"]]
    if hidden % d == 0 and _padding(hidden // d, need) is not None:
        return hidden // d
    costs = {h: _padding(h, need) for h in range(max([k * n for k, n in need] or [1]), most + 1)}
    ok = {h: p for h, p in costs.items() if p is not None}
    if not ok:
        raise LopperError(f"no query-head count up to {most} fits every block's KV groups: the layout cannot hold "
                          "this model; keep the lopper folder (lopper.load())")
    log.warning("hidden %d is not a multiple of head_dim %d: llama.cpp and transformers' remote DeciLM code derive "
                "head_dim from hidden / heads and cannot read this export; vLLM reads head_dim", hidden, d)
    return min(ok, key=lambda h: (ok[h], -h))


def _groups(h: int, k: int, n: int) -> int | None:
    """The fewest KV groups k' >= k with h / k' whole and >= n query heads per group."""
    return next((g for g in range(k, h + 1) if h % g == 0 and h // g >= n), None)


def _padding(h: int, need: list[tuple[int, int]]) -> int | None:
    """Padded query heads plus padded KV groups (each costs 2 x head_dim x hidden) for H = h, None if h fails."""
    groups = [_groups(h, k, n) for k, n in need]
    return None if None in groups else sum(h - k * n + g - k for (k, n), g in zip(need, groups))


def _pad_attention(adapter, layer, w: dict, n_heads: int, state: dict, names: dict, bias: bool) -> dict:
    """`bias`: the model's q/k/v have biases; the layout's attention_bias then gives o_proj one too (zero if absent,
    as in Qwen2)."""
    a = adapter.attention(layer)
    if not w["heads"]:
        _drop(state, names, [a, *adapter.layer_norms(layer)[:1]])
        return {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    k, n, d = w["kv_heads"], w["heads"] // w["kv_heads"], adapter.head_dim()
    groups = _groups(n_heads, k, n)
    per = n_heads // groups
    for proj, heads, room in ((a.q_proj, n, per), (a.k_proj, 1, 1), (a.v_proj, 1, 1)):
        for name, t in _params(proj, names):  # rows: [k groups, heads, d] -> [groups, room, d]
            new = t.new_zeros(groups, room, d, *t.shape[1:])
            new[:k, :heads] = t.reshape(k, heads, d, *t.shape[1:])
            state[name] = new.reshape(-1, *t.shape[1:])
    o = a.o_proj.weight  # columns: [k groups, n heads, d]
    new = o.new_zeros(o.shape[0], groups, per, d)
    new[:, :k, :n] = o.reshape(o.shape[0], k, n, d)
    state[names[id(a.o_proj)] + ".weight"] = new.reshape(o.shape[0], -1)
    if bias and a.o_proj.bias is None:
        state[names[id(a.o_proj)] + ".bias"] = o.new_zeros(o.shape[0])
    return {"n_heads_in_group": per, "no_op": False, "replace_with_linear": False}


def _pad_mlp(adapter, layer, w: dict, state: dict, names: dict, hidden: int, keep: bool) -> dict:
    """`keep`: the block has an attention, so an MLP cut to nothing stays as 256 zero channels: llama.cpp ends a
    block at a no_op MLP before adding the attention's output to the stream (its only such blocks have neither)."""
    if not w["mlp"] and not keep:
        _drop(state, names, [layer.mlp, *adapter.layer_norms(layer)[1:]])
        return {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
    width = max(256, -(-w["mlp"] // 256) * 256)
    for proj in adapter.mlp_in(layer):
        for name, t in _params(proj, names):
            new = t.new_zeros(width, *t.shape[1:])
            new[:w["mlp"]] = t
            state[name] = new
    down = adapter.mlp_out(layer).weight
    new = down.new_zeros(down.shape[0], width)
    new[:, :w["mlp"]] = down
    state[names[id(adapter.mlp_out(layer))] + ".weight"] = new
    return {"ffn_mult": ffn_mult(width, hidden), "no_op": False, "replace_with_linear": False}


def _params(module, names: dict):
    """(state-dict name, tensor) of a Linear's weight and bias."""
    return [(f"{names[id(module)]}.{k}", p) for k, p in module.named_parameters(recurse=False)]


def _drop(state: dict, names: dict, modules: list) -> None:
    prefixes = tuple(names[id(m)] + "." for m in modules)
    for k in [k for k in state if k.startswith(prefixes)]:
        del state[k]
