"""Memory: what a prune will need, estimated from the config before any work, and what it used.

The in-memory path holds the whole model at the compute dtype all along; on top of it, one phase at a time:
- loading: the checkpoint's bytes (safetensors are memory-mapped and read while the model is filled), CPU only;
- calibration: every window's hidden states entering and leaving the current layer, 2 x [N, L, hidden] at the
  compute dtype (importance.collect runs layer by layer), two float32 normalized copies of one window, and the
  logits [L, vocab] in float32; with --layer-metric angular also every boundary's normalized stream,
  [layers + 1, N, L, hidden] in float32;
- repair (lsq): the calibration hidden states [N, L, hidden], four times with --repair-correct > 0 (the cut and
  the unpruned stream, and the two targets of _toward_teacher), and the widest writer's Gram matrix
  [I + 1, I + 1] in float32 with its float64 solve (20 bytes per entry);
- sparsity: the keep masks, bit-packed (1 bit a weight of the layers), and with SparseGPT one layer's Hessians,
  4 bytes x (2 hidden^2 + attention width^2 + I^2);
- --width-metric fisher: one window's backward: every layer's input [L, hidden] kept (checkpointing, in memory or
  by hand when streamed), one layer's recomputed activations (about 4 x [L, I] and 4 x [L, hidden] with their
  gradients), the logits [L, vocab] in float32 with their softmax and gradient, and the largest weight's gradient
  (the embedding's, [vocab, hidden]), all float32;
- the --params search (kl, the default, or loss): three more copies of the model (the candidate being tried and
  the scored ones the rule may still choose, counted at full size), the candidate's repair, with kl the unpruned
  model's log-probabilities on SEARCH_HELD windows, float16, and the unpruned residual stream that every
  candidate's repair reads (repair.TeacherStream: 2 x layers + 1 boundaries of [samples, seq_len, hidden]).
The estimate is weights + the largest phase + the runtime (torch and Python, about 0.5 GB on CPU). Measured on
a 0.72B random Llama (hidden 2560, 8 layers, bf16 checkpoint of 1.44 GB, 8 x 256 calibration tokens,
--repair lsq, CPU float32): 5.42 GB peak resident, against 4.86 GB from this rule. Planning accuracy, not a
bound: the point is to refuse a run that cannot fit before it loads anything, and to say what to change."""
from __future__ import annotations

import resource
import sys

import torch

from .errors import LopperError
from .io import empty_model
from .select import SEARCH_HELD

GB = 10 ** 9
RUNTIME_CPU = GB // 2


def model_shape(config, model_cls) -> dict:
    """Parameters (tied once) and the widths the phases depend on, from an empty (meta-device) model."""
    shell = empty_model(model_cls, config)
    params = sum({id(p): p.numel() for p in shell.parameters()}.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", 0)
    mlp = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or getattr(text, "n_inner", None) \
        or 4 * hidden
    mlp = max(mlp) if isinstance(mlp, list) else mlp
    mlp = max(mlp, getattr(text, "moe_intermediate_size", 0) or 0)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1)
    stack = [m for m in shell.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in stack[0]), default=0) if stack else 0
    vocab = getattr(text, "vocab_size", 0)
    untied = not getattr(config, "tie_word_embeddings", True) and hasattr(shell, "lm_head")
    return {"params": params, "hidden": hidden, "mlp": mlp, "attention": heads * head_dim, "layers": layers,
            "vocab": vocab, "layer_params": layer_params, "untied_ends": 2 * vocab * hidden if untied else 0}


def estimate_prune(shape: dict, *, dtype: torch.dtype, device: str, checkpoint_bytes: int, samples: int,
                   seq_len: int, repair: bool, correct: float, sparsegpt: bool, search: bool, all_pairs: bool = False,
                   streamed: bool = False, sparse: bool = False, fisher: bool = False) -> dict:
    """Bytes per part and the estimated peak (`peak_bytes`) of `lopper prune`, in memory or streamed. Streamed, the
    weights held are those outside the layers and an untied embedding and head, plus whichever is larger of two
    layers and that embedding and head (each read only while used); loading reads one layer at a time."""
    size = dtype.itemsize
    h, n, L = shape["hidden"], samples, seq_len
    weights = shape["params"] * size
    loading = checkpoint_bytes if device == "cpu" else 0
    if streamed:
        layer, ends = shape["layer_params"], shape.get("untied_ends", 0)
        weights = (shape["params"] - shape["layers"] * layer - ends + max(2 * layer, ends)) * size
        loading = layer * checkpoint_bytes // max(shape["params"], 1) if device == "cpu" else 0
    repair_bytes = ((4 if correct > 0 else 1) * n * L * h * size + (shape["mlp"] + 1) ** 2 * 20) if repair else 0
    phases = {
        "loading": loading,
        "calibration": 2 * n * L * h * size + 2 * L * h * 4 + 2 * L * shape["vocab"] * 4
        + ((shape["layers"] + 1) * n * L * h * 4 if all_pairs else 0),
        "repair": repair_bytes,
        "sparsity": (4 * (2 * h * h + shape["attention"] ** 2 + shape["mlp"] ** 2) if sparsegpt else 0)
        + (shape["layers"] * shape["layer_params"] // 8 if sparse or sparsegpt else 0),
        "search": 3 * weights + repair_bytes + SEARCH_HELD * L * shape["vocab"] * 2
        + ((2 * shape["layers"] + 1) * n * L * h * size if repair and correct > 0 else 0) if search else 0,
        "fisher": 4 * (seq_len * (shape["layers"] + 1) * h + 8 * seq_len * (shape["mlp"] + h)
                       + 3 * seq_len * shape["vocab"] + shape["vocab"] * h) if fisher else 0,
    }
    largest = max(phases, key=phases.get)
    runtime = RUNTIME_CPU if device == "cpu" else 0
    return {"weights_bytes": weights, "phases_bytes": phases, "largest_phase": largest, "runtime_bytes": runtime,
            "peak_bytes": weights + phases[largest] + runtime, "device": device, "streamed": streamed}


def available(device: str) -> int:
    """Bytes free now: the CUDA device's free memory, or the machine's available memory (psutil)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil
    return psutil.virtual_memory().available


def fits(estimate: dict, device: str) -> bool:
    return estimate["peak_bytes"] <= available(device)


def check_fits(estimate: dict, device: str, what: str, first: str | None = None) -> None:
    """Refuse, before any work, a run whose estimated peak exceeds the memory available, naming what to change
    (`first`: the fix to name first, e.g. streaming)."""
    have = available(device)
    if estimate["peak_bytes"] <= have:
        return
    fixes = [first, "--device cuda" if device == "cpu" and torch.cuda.is_available() else None,
             "--dtype bfloat16 (half the weights)" if estimate["weights_bytes"] and device == "cpu" else None,
             "fewer --calib-samples" if estimate["largest_phase"] in ("repair", "calibration") else None,
             "--repair none" if estimate["largest_phase"] == "repair" else None,
             "--params-search rule" if estimate["largest_phase"] == "search" else None]
    raise LopperError(f"{what} needs about {estimate['peak_bytes'] / GB:.1f} GB on {device} (weights "
                      f"{estimate['weights_bytes'] / GB:.1f} GB + {estimate['largest_phase']} "
                      f"{estimate['phases_bytes'][estimate['largest_phase']] / GB:.1f} GB), but {have / GB:.1f} GB "
                      f"is available: free memory, or use {', or '.join(f for f in fixes if f) or 'a larger machine'}")


def peak(device: str) -> dict:
    """The measured peak: torch.cuda.max_memory_allocated on CUDA, else the process's peak resident set."""
    if device.startswith("cuda"):
        return {"peak_bytes": torch.cuda.max_memory_allocated(torch.device(device)),
                "method": "torch.cuda.max_memory_allocated"}
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": kb if sys.platform == "darwin" else kb * 1024,
            "method": "peak resident set of the process (getrusage ru_maxrss)"}
