"""What a model returns, as the logits tensor the rest of haprune works on.

Models that nobody here wrote return more than a tensor: Hugging Face models a ``ModelOutput`` (a dict subclass
with ``logits``), others a dict or a tuple whose first element is the logits. :func:`logits_of` takes any of
these; a user with another convention passes ``output_fn`` (e.g. ``lambda out: out["scores"]``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["logits_of", "OutputFn"]

OutputFn = Callable[[Any], torch.Tensor]


def logits_of(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The logits in ``output``: ``output_fn(output)`` when given; else the tensor itself, a mapping's (or
    ``ModelOutput``'s) ``logits`` entry, or a tuple's / list's first element. Raises TypeError naming the type
    and the fix otherwise."""
    if output_fn is not None:
        out = output_fn(output)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"output_fn returned {type(out).__name__}, not a tensor of logits")
        return out
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the model returned {type(output).__name__}, from which haprune cannot take the logits (it takes a tensor, "
        f"a mapping or ModelOutput with 'logits', or a tuple whose first element is the logits); pass "
        f"output_fn=... to say where they are")
