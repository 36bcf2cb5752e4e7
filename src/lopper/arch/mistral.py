"""Mistral: the Llama layout with sliding-window attention; its config does not tie heads to hidden_size."""
from .base import Adapter


class MistralAdapter(Adapter):
    model_types = ("mistral",)
