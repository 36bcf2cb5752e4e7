"""Load a model for pruning, and save a pruned one atomically (temporary folder, then rename)."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import load_file

from .arch import SUPPORTED, Adapter, adapter_class
from .errors import LopperError
from .plan import Plan

PLAN_FILE = "lopper_plan.json"
REPORT_FILE = "lopper_report.json"
# Files beside the weights that make the output a drop-in replacement (tokenizer, sentence-transformers pooling).
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
              "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "modules.json",
              "sentence_bert_config.json", "config_sentence_transformers.json")
COPY_DIRS = ("1_Pooling", "2_Normalize")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise LopperError(f"--dtype {name!r} is unknown: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def read_config(source: str):
    p = Path(source)
    if p.exists() and not (p / "config.json").is_file():
        raise LopperError(f"{source} has no config.json: point at a Hugging Face model folder")
    try:
        return transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise LopperError(f"cannot read the config of {source} ({_one_line(e)}): give a local model folder or a hub "
                          "id that is in the local cache")


def model_class(config) -> type:
    """The class named in config.architectures when transformers has it, else the Auto class for the family."""
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel if adapter_class(config.model_type).is_encoder else transformers.AutoModelForCausalLM


def load_model(source: str, device: str = "cpu", dtype: str = "auto"):
    """Returns (model, tokenizer or None, adapter). A folder saved by lopper with a non-standard layout is rebuilt
    from its plan. Refuses folders with missing or unreadable weights instead of filling them randomly."""
    config = read_config(source)
    cls = adapter_class(config.model_type)
    torch_dtype = resolve_dtype(dtype, device)
    if getattr(config, "lopper_layout", None) == "plan":
        model = _load_replayed(source, config, torch_dtype)
    else:
        try:
            model, info = model_class(config).from_pretrained(source, dtype=torch_dtype, output_loading_info=True)
        except Exception as e:  # safetensors, OSError, shape mismatches: all mean the folder is broken
            raise LopperError(f"cannot load the weights of {source} ({_one_line(e)}): the folder is incomplete or "
                              "corrupt; download it again")
        missing = [k for k in info["missing_keys"] if not k.endswith("lm_head.weight") or not
                   getattr(config, "tie_word_embeddings", False)]
        if missing:
            raise LopperError(f"{source} lacks weights for {len(missing)} tensors (e.g. {missing[0]}): the folder "
                              "is incomplete; download it again")
    model.to(device).eval()
    return model, _tokenizer(source), cls(model)


def _load_replayed(source: str, config, dtype: torch.dtype):
    from .surgery import apply

    folder = Path(source)
    plan = Plan.load(folder / PLAN_FILE)
    del config.lopper_layout
    with init_empty_weights():
        model = model_class(config)._from_config(config, dtype=dtype)
    adapter = adapter_class(config.model_type)(model)
    apply(model, adapter, plan)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    state = adapter.load_state(state)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LopperError(f"the weights in {source} do not match its plan ({_one_line(e)}): the folder is corrupt")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LopperError(f"{source} lacks weights for {missing[0]}: the folder is incomplete")
    return model.to(dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "tokenizer_config.json")


def _tokenizer(source: str):
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer that yields no tokens
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception:  # a model folder without tokenizer files: fine for magnitude-only pruning
        return None


def check_output(out: str | Path, force: bool, source: str) -> Path:
    """Fail before any work if the output folder is taken or is the input."""
    out = Path(out)
    if Path(source).exists() and out.resolve() == Path(source).resolve():
        raise LopperError(f"--out {out} is the input model: write the pruned model to another folder")
    if out.exists() and not force:
        raise LopperError(f"--out {out} already exists: choose another folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LopperError(f"--out {out} is a file: choose a folder path")
    return out


def save(model, out: str | Path, *, source: str, tokenizer, plan: Plan | None, report: dict, dtype: torch.dtype | None,
         force: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Write weights (safetensors), config, tokenizer files, the plan and the report into a temporary sibling folder,
    then rename it to `out`; an existing `out` is replaced only with force=True, and only after the new one is
    complete. `files`: more files (name -> bytes) to write beside the weights, e.g. the sparsity masks."""
    with staged(out, force, source) as tmp:
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        _add_legacy_config_keys(tmp / "config.json")
        copy_side_files(source, tmp, tokenizer)
        if plan is not None:  # heal of a model that lopper did not prune
            plan.save(tmp / PLAN_FILE)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out)


@contextmanager
def staged(out: str | Path, force: bool, source: str):
    """A temporary sibling folder to write into; renamed to `out` when the block ends without an error (replacing
    an existing `out` only with force=True, and only then), removed otherwise."""
    out = check_output(out, force, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.lopper-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.lopper-old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(source: str, dest: Path, tokenizer) -> None:
    src = Path(source)
    if not src.is_dir():
        if tokenizer is not None:
            tokenizer.save_pretrained(dest)
        return
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    for name in COPY_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)


def _add_legacy_config_keys(path: Path) -> None:
    """transformers 5 writes RoPE settings only as `rope_parameters`; 4.5x reads `rope_theta`/`rope_scaling` and
    would silently fall back to its defaults. Write both so the folder means the same in either version."""
    cfg = json.loads(path.read_text())
    before = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    legacy = adapter_class(cfg["model_type"]).legacy_keys if cfg.get("model_type") in SUPPORTED else {}
    for old, new in legacy.items():
        if new in cfg and old not in cfg:
            cfg[old] = cfg[new]
    if cfg != before:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _one_line(e: Exception) -> str:
    s = " ".join(str(e).split())
    return s if len(s) < 200 else s[:197] + "..."
