"""Tiny models of every supported family, built from configs with random weights (offline, milliseconds)."""
from __future__ import annotations

import torch
import transformers

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = DECODERS + ("bert",)


def tiny_config(family: str, layers=3, heads=4, kv_heads=2, head_dim=8, mlp=24, tied=False, vocab=96):
    hidden = heads * head_dim  # satisfies every config class's hidden % heads rule
    if family == "bert":
        return transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=heads, intermediate_size=mlp, max_position_embeddings=64,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    return cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp, max_position_embeddings=128,
               tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = tiny_config(family, **kw)
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
