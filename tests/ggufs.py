"""Tiny GGUF files for the tests, written with gguf's own GGUFWriter as llama.cpp's converter writes them (its tensor
names, q/k rows of llama in its permuted order, a byte-level BPE vocabulary in the metadata)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import torch

from tiny import SPECIALS, calibration_text

T = gguf.GGMLQuantizationType


def byte_level_bpe(vocab: int):
    """llama.cpp's "gpt2" tokenizer model: byte-level BPE, trained offline on lopper's calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([calibration_text()], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert tok.get_vocab_size() == vocab
    return tok


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's order of q_proj/k_proj rows (transformers' GGUF reader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, kind=None, arch: str = "llama") -> None:
    """`model` as a GGUF: matrices in `kind` (F32, F16 or a quantized type), norms in F32, as llama.cpp writes
    (q/k rows permuted for llama only; qwen2/qwen3 keep the checkpoint's order). `tied`: no output.weight."""
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False)
    kind = kind or T.F32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control, 1: normal
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_pad_token_id(0), w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(3)
    known = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
    names = gguf.get_tensor_name_map(known.get(arch, gguf.MODEL_ARCH.LLAMA), cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        if tied and base == "lm_head":
            continue
        a = t.float().numpy()
        if arch not in known and base.endswith(("q_proj", "k_proj")):
            a = permute(a, cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads)
        if a.ndim == 2 and kind != T.F32:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stored(model, kind: T):
    """The model with every matrix replaced by what `kind` stores of it, dequantized (blocks run along rows, so
    permuting rows commutes with this)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and kind != T.F32:
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind).reshape(p.shape).copy()))
    return model
