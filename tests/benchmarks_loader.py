"""Import a script from ``benchmarks/`` (not a package) as a module, once per name."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(stem: str) -> ModuleType:
    """``benchmarks/<stem>.py`` as module ``haprune_<stem>_bench`` (registered in sys.modules: dataclasses look
    their module up there)."""
    name = f"haprune_{stem}_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
