"""CPU thread settings shared by latency tables and reports (a leaf module: it imports nothing of haprune)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["num_threads"]


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (unchanged when None), then restore the old value."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive number of CPU threads, got {threads}")
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)
