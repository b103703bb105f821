"""Lazy package attributes (PEP 562): names imported from their submodule on first use, so that importing a
package (``import haprune``, ``import haprune.hf.cli``) does not pay for torch."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(package: str, lazy: Mapping[str, str], listed: Iterable[str] = ()
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``lazy`` maps each name to the submodule that defines it (the
    value is cached in the package on first use); ``dir()`` lists the package's globals, ``lazy`` and ``listed``."""
    listed = tuple(listed)

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(lazy) | set(listed))

    return __getattr__, __dir__
