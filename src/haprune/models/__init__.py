"""Reference networks in a small string-addressable registry.

Plain ``nn.Module`` classes: nothing here imports the rest of haprune, so any model a user brings is treated
exactly like these. ``create_model("resnet56", in_channels=1, num_classes=10)`` builds one.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from .resnet import resnet20, resnet32, resnet56, resnet110
from .vgg import vgg16_bn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg16_bn": vgg16_bn,
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a factory ``f(in_channels=, num_classes=, **kw) -> nn.Module`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def create_model(name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model by name (see :func:`list_models`)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}") from None
    return factory(in_channels=in_channels, num_classes=num_classes, **kwargs)


__all__ = ["create_model", "list_models", "register_model"]
