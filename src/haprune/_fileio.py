"""Atomic file writes: a reader sees either the old file or the complete new one, never a torn write.

Every writer puts the bytes into a temporary file in the destination's own directory (so the final rename
stays on one file system), flushes and fsyncs it, then ``os.replace``-s it over the destination.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch
from safetensors.torch import save as _safetensors_bytes

PathLike = Union[str, "os.PathLike[str]"]
_FILE_MODE = 0o644  # mkstemp creates 0o600; written files should be as readable as ones made by open()


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating missing parent directories."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp_name, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, keys in insertion order, trailing newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None
) -> None:
    """Save ``tensors`` as a safetensors file at ``path`` atomically.

    Tensors are detached, moved to the CPU and made contiguous first; ``metadata`` values must be strings.
    """
    plain: Dict[str, torch.Tensor] = {
        name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()
    }
    atomic_write_bytes(path, _safetensors_bytes(plain, metadata=dict(metadata) if metadata else None))


def _fsync_directory(directory: Path) -> None:
    """Persist a rename on file systems that need the directory fsynced (best effort: not all platforms can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors"]
