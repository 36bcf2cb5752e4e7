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
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        return cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                   intermediate_size=mlp, max_position_embeddings=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, initializer_range=init)
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
    encoder = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}.get(family)
    model = encoder(config) if encoder else transformers.AutoModelForCausalLM.from_config(config)
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


# ---- mixture-of-experts decoders -----------------------------------------------------------------------------------
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_moe(family: str, seed: int = 0, layers=3, heads=4, kv_heads=2, head_dim=8, experts=4, top_k=2, per=16,
             dense=(), shared=16, mlp=24, norm_topk=True, tied=False, init=0.2, vocab=96):
    """A random tiny MoE decoder. `dense`: layer indices with a dense MLP of `mlp` channels (Qwen MoE
    mlp_only_layers); `shared`: Qwen2-MoE's shared-expert width. Eager kernels: tiny widths are not the multiples
    of 8 that transformers' default grouped_mm experts kernel needs."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, num_experts_per_tok=top_k, max_position_embeddings=128,
                  tie_word_embeddings=tied, initializer_range=init, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=per, num_local_experts=experts, head_dim=head_dim, **common)
    else:
        cls = {"qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[family]
        extra = {"shared_expert_intermediate_size": shared} if family == "qwen2_moe" else {"head_dim": head_dim}
        cfg = cls(intermediate_size=mlp, moe_intermediate_size=per, num_experts=experts, mlp_only_layers=list(dense),
                  norm_topk_prob=norm_topk, **extra, **common)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norm weights, so that slicing mistakes show in the outputs
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def char_tokenizer(vocab: int):
    """A character-level tokenizer of `vocab` ids: enough to calibrate a random tiny model on real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 32 + vocab - 1)]
    tok = Tokenizer(models.WordLevel({c: i + 1 for i, c in enumerate(chars)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


# ---- GPT-2, OPT, Phi-3, Gemma 2 / 3 (large random weights: a wrongly kept unit moves the outputs by O(1)) ------------
VOCAB = 96


def make_config(family: str, layers=3, heads=4, kv_heads=2, head_dim=8, mlp=24, tied=False, hidden=None, init=0.2,
                **extra):
    """hidden: Gemma only (its head_dim is independent of hidden_size); elsewhere hidden = heads * head_dim."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":  # GPT2LMHeadModel always ties lm_head to wte
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_layer=layers, n_head=heads, n_embd=heads * head_dim,
                                      n_inner=mlp, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=init, **ids, **extra)
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads,
                                     hidden_size=heads * head_dim, ffn_dim=mlp, max_position_embeddings=64,
                                     dropout=0.0, tie_word_embeddings=tied, init_std=init, **ids, **extra)
    elif family == "phi3":
        cfg = transformers.Phi3Config(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, hidden_size=heads * head_dim,
                                      intermediate_size=mlp, max_position_embeddings=128, tie_word_embeddings=tied,
                                      initializer_range=init, **ids, **extra)
    else:
        cls = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}[family]
        extra.setdefault("sliding_window", 4)  # shorter than the test inputs: a layer with the wrong type shows
        cfg = cls(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, hidden_size=hidden or heads * head_dim, intermediate_size=mlp,
                  query_pre_attn_scalar=head_dim, max_position_embeddings=128, tie_word_embeddings=tied,
                  initializer_range=init, **ids, **extra)
    cfg._attn_implementation = "eager"  # fast on CPU for tiny shapes; Gemma 2 needs it for soft-capping anyway
    return cfg


def make_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, **kw))
    gemma = family.startswith("gemma")
    with torch.no_grad():  # random norm weights and biases, so that slicing mistakes show in the outputs
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p)) if name.endswith("weight") else \
                    p.normal_(0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()
