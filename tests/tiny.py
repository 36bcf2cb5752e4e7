"""Tiny models of every supported family, built from configs with random weights (offline, milliseconds)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import transformers

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = DECODERS + ("bert",)


def tiny_config(family: str, layers=3, heads=4, kv_heads=2, head_dim=8, mlp=24, tied=False, vocab=96, init=0.02):
    """`init`: std of the random weights (initializer_range); larger makes every removed unit show in the outputs."""
    hidden = heads * head_dim  # satisfies every config class's hidden % heads rule
    if family == "bert":
        return transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=mlp, max_position_embeddings=64,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       initializer_range=init)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp, max_position_embeddings=128,
               tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=init)


def tiny_model(family: str, seed: int = 0, attn: str | None = None, **kw):
    """attn: attention implementation ("eager", "sdpa"; None: transformers' default). Eager is much faster on CPU
    for tiny grouped-query shapes, and reads the per-module head counts that surgery rewrites."""
    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
    if attn:
        config._attn_implementation = attn
    cls = transformers.BertModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config) if family != "bert" else cls(config)
    with torch.no_grad():  # random norm weights and biases so that slicing mistakes show in the outputs
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- model folders with a tokenizer (for prune/save/load/CLI tests) ------------------------------------------------
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3: the tiny configs' pad/bos/eos ids


def calibration_text() -> str:
    from lopper.text import default_calibration_path
    return default_calibration_path().read_text(encoding="utf-8")


def tiny_tokenizer(vocab: int = 96):
    """A BPE tokenizer with exactly `vocab` entries, trained offline on lopper's shipped calibration text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, limit_alphabet=vocab // 2,
                                  show_progress=False)
    tok.train_from_iterator([calibration_text()], trainer)
    assert tok.get_vocab_size() <= vocab
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def save_tiny(folder, family: str, seed: int = 0, tokenizer: bool = True, **kw):
    """Write a tiny model (save_pretrained, safetensors) and, by default, a matching tokenizer into `folder`."""
    model = tiny_model(family, seed=seed, **kw)
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (to prove a folder was left byte-identical)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
