"""Load a model for pruning, and save a pruned one atomically (temporary folder, then rename)."""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Callable

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers.utils import is_gguf_available

from .arch import SUPPORTED, adapter_class
from .errors import LopperError, one_line
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


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a config says its weights are stored in (outputs are saved in it), or None."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def read_config(source: str):
    if is_gguf(source):
        gguf_location(source)  # exists, and gguf is installed
        stat = Path(source).stat()
        return copy.deepcopy(_gguf_config(str(Path(source).resolve()), stat.st_mtime_ns, stat.st_size))
    p = Path(source)
    if p.exists() and not (p / "config.json").is_file():
        raise LopperError(f"{source} has no config.json: point at a Hugging Face model folder")
    try:
        return transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise LopperError(f"cannot read the config of {source} ({one_line(e)}): give a local model folder or a hub "
                          "id that is in the local cache")


def is_gguf(source: str) -> bool:
    return str(source).lower().endswith(".gguf")


def model_source(model: str, gguf_file: str = "") -> str:
    """The one path lopper reads: MODEL itself, or MODEL/NAME for `MODEL --gguf-file NAME`."""
    if not gguf_file:
        return model
    if is_gguf(model):
        raise LopperError(f"{model} is a .gguf file and --gguf-file {gguf_file} names another: give one of them")
    return str(Path(model) / gguf_file)


def gguf_location(source: str) -> tuple[str, str]:
    """(folder, file name) of a .gguf file, as transformers' `from_pretrained(folder, gguf_file=name)` takes them;
    checks first that the file exists and that the optional gguf package is there to read it."""
    p = Path(source)
    if not p.is_file():
        raise LopperError(f"{source} does not exist: give the path of a .gguf file, or a folder and --gguf-file NAME")
    if not is_gguf_available():
        raise LopperError(f'reading {p.name} needs the gguf package (0.17 or newer): pip install "lopper[gguf]"')
    return str(p.parent), p.name


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int, size: int):
    """The config transformers builds from a GGUF's metadata, with `dtype` set to what the pruned model is saved
    in. Cached (by path, time and size): parsing the metadata of a real file takes seconds, and prune needs it twice."""
    folder, name = gguf_location(path)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise LopperError(f"transformers cannot read {path} ({one_line(e)}): lopper reads GGUF files of "
                          f"{', '.join(gguf_families())}")
    if config.model_type not in gguf_families():
        raise LopperError(f"unsupported architecture model_type={config.model_type!r} in {name}: lopper reads GGUF "
                          f"files of {', '.join(gguf_families())}; pick a model of one of these families")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = gguf_dtype(path)
    return config


def gguf_families() -> list[str]:
    """lopper's families that transformers' GGUF loader reads too (its name for gemma3_text is gemma3)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return [t for t in SUPPORTED if t.removesuffix("_text") in GGUF_CONFIG_MAPPING]


def gguf_dtype(path: str) -> torch.dtype:
    """The dtype a model read from this GGUF is saved in: the file's own float type when every matrix is F32, F16
    or BF16 (float32 if they mix). Quantized matrices are saved in bfloat16, the dtype most such models were
    released in, at half the size of float32. That is a rounding, not a copy: bfloat16 holds few dequantized values exactly
    (SmolLM2-135M Q4_1: 21%); the others move by at most 2^-8 of their value, there under 5% of a Q4_1 step."""
    from gguf import GGMLQuantizationType as T, GGUFReader

    floats = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
    kinds = {floats.get(t.tensor_type) for t in GGUFReader(path).tensors if len(t.shape) >= 2}
    if None in kinds:
        return torch.bfloat16
    return kinds.pop() if len(kinds) == 1 else torch.float32


def _drop_quantization(model) -> None:
    """transformers marks a model read from a GGUF as quantized (quant_method gguf) although its weights are
    dequantized, and then refuses save_pretrained: unmark it, so it is a plain model and saves as one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _gguf_bar_hidden(source: str):
    """transformers' GGUF reader draws a tqdm bar of its own that transformers' disable_progress_bar() (lopper's
    --quiet) does not reach: send it to /dev/null then. Errors still arrive as exceptions."""
    if not is_gguf(source) or transformers.utils.logging.is_progress_bar_enabled():
        yield
        return
    with open(os.devnull, "w") as null, redirect_stderr(null):
        yield


def model_class(config) -> type:
    """The class named in config.architectures when transformers has it, else the Auto class for the family."""
    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel if adapter_class(config.model_type).is_encoder else transformers.AutoModelForCausalLM


def empty_model(cls, config, dtype: torch.dtype | None = None):
    """A model of class `cls` (a model class or an Auto class) with its parameters on the meta device and tied
    embeddings tied (which `_from_config` does not do on meta tensors): shapes and counts without memory. The
    config is copied, so surgery on the shell leaves the caller's config alone."""
    with init_empty_weights():
        make = getattr(cls, "_from_config", None) or cls.from_config
        shell = make(copy.deepcopy(config), **({"dtype": dtype} if dtype is not None else {}))
    shell.tie_weights()
    return shell


def load_model(source: str, device: str = "cpu", dtype: str = "auto"):
    """Returns (model, tokenizer or None, adapter). A folder saved by lopper with a non-standard layout is rebuilt
    from its plan. Refuses folders with missing or unreadable weights instead of filling them randomly."""
    config = read_config(source)
    cls = adapter_class(config.model_type)
    torch_dtype = resolve_dtype(dtype, device)
    if getattr(config, "lopper_layout", None) == "plan":
        model = _load_replayed(source, config, torch_dtype)
    else:
        where, kw = source, {}
        if is_gguf(source):  # dequantized: lopper cuts dense tensors (GgufConfig: transformers 5 can keep blocks)
            where, name = gguf_location(source)
            kw = {"gguf_file": name, "config": config}
            if hasattr(transformers, "GgufConfig"):
                kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
        try:
            with _gguf_bar_hidden(source):
                model, info = model_class(config).from_pretrained(where, dtype=torch_dtype, output_loading_info=True,
                                                                  **kw)
        except Exception as e:  # safetensors, OSError, shape mismatches: all mean the folder is broken
            raise LopperError(f"cannot load the weights of {source} ({one_line(e)}): the folder is incomplete or "
                              "corrupt; download it again")
        _drop_quantization(model)
        missing = [k for k in info["missing_keys"] if not k.endswith("lm_head.weight") or not
                   getattr(config, "tie_word_embeddings", False)]
        if missing:
            raise LopperError(f"{source} lacks weights for {len(missing)} tensors (e.g. {missing[0]}): the folder "
                              "is incomplete; download it again")
    model.to(device).eval()
    return model, load_tokenizer(source), cls(model)


def _load_replayed(source: str, config, dtype: torch.dtype):
    from .surgery import apply

    folder = Path(source)
    plan = Plan.load(folder / PLAN_FILE)
    del config.lopper_layout
    model = empty_model(model_class(config), config, dtype)
    adapter = adapter_class(config.model_type)(model)
    apply(model, adapter, plan)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    state = adapter.load_state(state)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LopperError(f"the weights in {source} do not match its plan ({one_line(e)}): the folder is corrupt")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LopperError(f"{source} lacks weights for {missing[0]}: the folder is incomplete")
    return model.to(dtype)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "tokenizer_config.json")


def load_tokenizer(source: str):
    """The source's tokenizer, or None where it has none (magnitude-only pruning needs none)."""
    if is_gguf(source):  # the vocabulary and merges are in the GGUF's metadata
        folder, name = gguf_location(source)
        try:
            return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception:
            return None
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


def save(model, out: str | Path, *, source: str, tokenizer, plan: Plan | None, report: dict | Callable[[Path], dict],
         dtype: torch.dtype | None, force: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Write weights (safetensors), config, tokenizer files, the plan and the report into a temporary sibling folder,
    then rename it to `out`; an existing `out` is replaced only with force=True, and only after the new one is
    complete. `files`: more files (name -> bytes) to write beside the weights, e.g. the sparsity masks. `report` may
    be a function of the staged folder, called once everything else is in it (the report then holds the size on disk
    of what is renamed)."""
    with staged(out, force, source) as tmp:
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        write_beside(tmp, source=source, tokenizer=tokenizer, plan=plan, report=report, files=files)
    return Path(out)


def write_beside(folder: Path, *, source: str, tokenizer, plan: Plan | None, report: dict | Callable[[Path], dict],
                 files: dict[str, bytes] | None = None) -> None:
    """What goes beside the weights and config.json: legacy config keys, tokenizer files, plan, `files`, and last
    the report (`report(folder)` when it is a function). Every file gets the mode a new file gets here (the
    safetensors writer leaves its temporary file's 600)."""
    add_legacy_config_keys(folder / "config.json")
    copy_side_files(source, folder, tokenizer)
    if plan is not None:  # heal of a model that lopper did not prune
        plan.save(folder / PLAN_FILE)
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    report = report(folder) if callable(report) else report
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    mode = 0o666 & ~current_umask()
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(mode)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    """A folder's tokenizer (and sentence-transformers) files are copied as they are; a hub id or a .gguf file has
    none to copy, so the loaded tokenizer writes its own."""
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


def add_legacy_config_keys(path: Path) -> None:
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
