"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (sliced with their rows) and per-layer `layer_types`."""
from .base import Adapter


class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
