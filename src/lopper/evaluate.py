"""What a pruned model is measured by: perplexity, parameter counts, size on disk."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter
from .errors import LopperError
from .io import empty_model
from .plan import Plan
from .text import read_text, token_stream


def count_params(model: nn.Module, adapter: Adapter) -> dict[str, int]:
    """Total parameters (tied ones once) and those outside the embeddings and lm_head."""
    unique = {id(p): p.numel() for p in model.parameters()}
    embed = {id(p): p.numel() for p in adapter.embedding_params()}
    total = sum(unique.values())
    return {"params": total, "params_non_embedding": total - sum(embed.values())}


def planned_params(model: nn.Module, adapter_cls: type[Adapter], plan: Plan) -> dict[str, int]:
    """Parameter counts the plan would give, computed on an empty (meta-device) copy: exact, and cheap."""
    from .surgery import apply, silenced

    if getattr(model.config, "lopper_layout", None):
        raise LopperError("this model was saved with a lopper layout (its config keeps the original widths), which "
                          "cannot be pruned again yet: prune the original model with the combined cut instead")
    shell = empty_model(type(model), model.config)
    shell_adapter = adapter_cls(shell)
    with silenced():
        apply(shell, shell_adapter, plan)
    return count_params(shell, shell_adapter)


def weights_size(folder: str | Path) -> int:
    """Bytes of weight files in a model folder, or of one weights file (a .gguf)."""
    if Path(folder).is_file():
        return Path(folder).stat().st_size
    files = [f for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    return sum(f.stat().st_size for f in files)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text_path: str | Path, seq_len: int = 512, max_tokens: int = 0,
               quiet: bool = False) -> dict:
    """exp(total NLL / total predicted tokens) over non-overlapping windows of `seq_len` tokens of one stream;
    a window predicts seq_len - 1 tokens. The last partial window is dropped."""
    stream = token_stream(tokenizer, read_text(text_path, "--text"))
    if max_tokens:
        stream = stream[:max_tokens]
    windows = len(stream) // seq_len
    if windows == 0:
        raise LopperError(f"--text {text_path} has {len(stream)} tokens, fewer than one window of --seq-len "
                          f"{seq_len}: give a longer text or a smaller --seq-len")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in tqdm(range(windows), desc="perplexity", disable=quiet, leave=False):
        ids = stream[w * seq_len:(w + 1) * seq_len][None].to(device)
        logits = model(input_ids=ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows,
            "seq_len": seq_len}


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: list[torch.Tensor], reference: list[torch.Tensor] | None = None):
    """Mean next-token cross-entropy over the windows (causal LMs), or, with `reference` (the unpruned model's
    mean-pooled outputs), mean 1 - cosine of the pooled outputs (encoders)."""
    device = next(model.parameters()).device
    total = 0.0
    for k, ids in enumerate(windows):
        out = model(input_ids=ids.to(device))
        if reference is None:
            total += torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:].to(device)).item()
        else:
            pooled = out.last_hidden_state.float().mean(1)
            total += 1 - torch.nn.functional.cosine_similarity(pooled, reference[k].to(device)).mean().item()
    return total / len(windows)
