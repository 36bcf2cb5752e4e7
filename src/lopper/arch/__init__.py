"""One adapter per architecture family; `adapter_for` picks it from `config.model_type`."""
from ..errors import LopperError
from .base import Adapter, Part
from .bert import BertAdapter
from .gemma import GemmaAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .opt import OPTAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: list[type[Adapter]] = [LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, BertAdapter, GPT2Adapter,
                                 OPTAdapter, Phi3Adapter, GemmaAdapter]
SUPPORTED = sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_class(model_type: str) -> type[Adapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise LopperError(f"unsupported architecture model_type={model_type!r}: lopper supports {', '.join(SUPPORTED)}; "
                      "pick a model of one of these families")


def adapter_for(model) -> Adapter:
    return adapter_class(model.config.model_type)(model)


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "Part", "adapter_class", "adapter_for"]
