"""Llama (and the many checkpoints that reuse LlamaForCausalLM: Llama 2/3, TinyLlama, SmolLM, ...).

LlamaConfig in transformers 5 rejects `hidden_size % num_attention_heads != 0` even when `head_dim` is set, so the
planner only picks head counts and hidden widths that keep that rule (`check_config`).
"""
from .base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama",)
