"""Reference networks in a small string-addressable registry.

Plain ``nn.Module`` classes: nothing here imports the rest of haprune, so any model a user brings is treated
exactly like these. ``create_model("resnet56", in_channels=1, num_classes=10)`` builds one. The reference
modules (and torch) are imported when a model is built, not when the names are listed, so the command line
can offer them as choices without the seconds torch takes to import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Union

if TYPE_CHECKING:
    import torch.nn as nn

# name -> factory, or "module:function" of a reference model (imported on first use)
_REGISTRY: Dict[str, Union[str, Callable[..., "nn.Module"]]] = {
    "resnet20": "resnet:resnet20",
    "resnet32": "resnet:resnet32",
    "resnet56": "resnet:resnet56",
    "resnet110": "resnet:resnet110",
    "vgg16_bn": "vgg:vgg16_bn",
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def register_model(name: str, factory: Callable[..., "nn.Module"]) -> None:
    """Add a factory ``f(in_channels=, num_classes=, **kw) -> nn.Module`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def _factory(name: str) -> Callable[..., "nn.Module"]:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, function = entry.split(":")
        entry = getattr(importlib.import_module(f".{module}", __name__), function)
        _REGISTRY[name] = entry
    return entry


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> "nn.Module":
    """Build a registered model by name (see :func:`list_models`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return _factory(name)(in_channels=in_channels, num_classes=num_classes, **kwargs)


def __getattr__(name: str) -> Any:  # ``from haprune.models import resnet20`` as before
    if name in _REGISTRY and isinstance(_REGISTRY[name], str):
        return _factory(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_model", "list_models", "register_model"]
