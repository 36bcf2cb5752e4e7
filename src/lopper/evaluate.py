"""What a pruned model is measured by: perplexity, parameter counts, size on disk."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import Adapter, adapter_for
from .errors import LopperError
from .io import empty_model
from .layerwise import call_layer, capture_layer_inputs, is_streamed, layers_skipped, outside_resident, resident
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
    a window predicts seq_len - 1 tokens. The last partial window is dropped. A model whose layers are streamed
    (stream.py) is run one layer at a time over `STREAMED_WINDOWS` windows at once."""
    stream = token_stream(tokenizer, read_text(text_path, "--text"))
    if max_tokens:
        stream = stream[:max_tokens]
    windows = len(stream) // seq_len
    if windows == 0:
        raise LopperError(f"--text {text_path} has {len(stream)} tokens, fewer than one window of --seq-len "
                          f"{seq_len}: give a longer text or a smaller --seq-len")
    adapter = adapter_for(model)
    streamed = any(is_streamed(layer) for layer in adapter.layers())
    device = next(p.device for p in model.parameters() if not p.is_meta)
    chunk = STREAMED_WINDOWS if streamed else 1
    nll, count = 0.0, 0
    for w in tqdm(range(0, windows, chunk), desc="perplexity", disable=quiet, leave=False):
        ids = [stream[k * seq_len:(k + 1) * seq_len][None].to(device) for k in range(w, min(w + chunk, windows))]
        for x, logits in zip(ids, _streamed_logits(model, adapter, ids) if streamed else
                             [model(input_ids=ids[0]).logits]):
            nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
            count += seq_len - 1
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows,
            "seq_len": seq_len}


STREAMED_WINDOWS = 16  # hidden states held per layer pass: 16 x 512 x 4096 x 4 bytes = 134 MB for an 8B model


def _streamed_logits(model: nn.Module, adapter: Adapter, ids: list[torch.Tensor]):
    """Each window's logits [1, L, vocab], the layers read once for all the windows (yielded one at a time)."""
    xs, calls = capture_layer_inputs(model, adapter, ids)
    for i, layer in enumerate(adapter.layers()):
        with resident(layer):
            xs = [call_layer(layer, x, calls[b][i]) for b, x in enumerate(xs)]
    with outside_resident(model, adapter):
        for x, y in zip(ids, xs):
            with layers_skipped(model, adapter, y):
                yield model(input_ids=x).logits


@torch.no_grad()
def teacher_outputs(model: nn.Module, windows: list[torch.Tensor], log_probs: bool) -> list[torch.Tensor] | None:
    """What calibration_loss compares a cut model with: for encoders the unpruned model's mean-pooled outputs
    [1, hidden]; for causal LMs with `log_probs` its next-token log-probabilities [L, vocab] (float16: 2 bytes an
    entry, and an error of a few 1e-3 on the log of a probability moves a KL in its fourth digit); else None."""
    device = next(model.parameters()).device
    if not hasattr(model, "lm_head"):
        return [model(input_ids=w.to(device)).last_hidden_state.float().mean(1) for w in windows]
    if not log_probs:
        return None
    return [model(input_ids=w.to(device)).logits[0].float().log_softmax(-1).half() for w in windows]


@torch.no_grad()
def window_losses(model: nn.Module, windows: list[torch.Tensor], reference: list[torch.Tensor] | None = None
                  ) -> list[float]:
    """Per window: without `reference`, next-token cross-entropy (causal LMs); with the unpruned model's
    log-probabilities [L, vocab] (teacher_outputs), the mean per-token KL(unpruned || this model); with its
    mean-pooled outputs [1, hidden] (encoders), 1 - cosine of the pooled outputs."""
    device = next(model.parameters()).device
    out_values = []
    for k, ids in enumerate(windows):
        out = model(input_ids=ids.to(device))
        if reference is None:
            value = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:].to(device)).item()
        elif hasattr(out, "logits"):
            teacher = reference[k].to(device).float()
            student = out.logits[0].float().log_softmax(-1)
            value = (teacher.exp() * (teacher - student)).sum(-1).mean().item()
        else:
            pooled = out.last_hidden_state.float().mean(1)
            value = 1 - torch.nn.functional.cosine_similarity(pooled, reference[k].to(device)).mean().item()
        out_values.append(value)
    return out_values


def calibration_loss(model: nn.Module, windows: list[torch.Tensor], reference: list[torch.Tensor] | None = None):
    """The mean of window_losses."""
    values = window_losses(model, windows, reference)
    return sum(values) / len(values)
