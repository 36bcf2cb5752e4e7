"""One adapter per architecture family; `adapter_for` picks it from `config.model_type`.

Every module of this package is imported and every Adapter subclass that names `model_types` is registered, so a
new family is one new file here and nothing else."""
import importlib
import pkgutil

from ..errors import LopperError
from .base import Adapter, Part

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")


def _all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


ADAPTERS: list[type[Adapter]] = [c for c in _all_subclasses(Adapter) if c.model_types]
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
