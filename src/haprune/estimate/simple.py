"""First-order and zeroth-order criteria, for honest comparison with the curvature ones.

All reduce over the whole structure (every tensor slice of the dependency group), like the curvature criteria.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from ..graph import StructureSet
from ..outputs import OutputFn
from .base import Batch, LossFn, check_loss, default_loss, forward_logits, structure_params


def magnitude(model: nn.Module, structures: StructureSet, p: int) -> torch.Tensor:
    """L1 (``p=1``: sum |w|) or L2 (``p=2``: sum w^2) magnitude of each structure's parameters."""
    names, params = structure_params(model, structures)
    return structures.reduce({n: w.detach().double().abs().pow(p) for n, w in zip(names, params)})


def taylor(model: nn.Module, structures: StructureSet, batches: list[Batch], *,
           loss_fn: LossFn = default_loss, output_fn: OutputFn | None = None,
           group: distributed.Group = None) -> dict[str, Any]:
    """First-order Taylor importance (Molchanov et al. 2019, group form): mean over batches of (sum_s g * w)^2,
    each batch weighted by its share of the samples. With ``group`` each rank passes its shard of the batches and
    the weighted sums are all-reduced."""
    names, params = structure_params(model, structures)
    acc = torch.zeros(structures.num_structures, dtype=torch.float64)
    total = int(distributed.all_reduce(torch.tensor([sum(len(y) for _, y in batches)]), group).item())
    for bi, (x, y) in enumerate(batches):
        loss = loss_fn(forward_logits(model, x, output_fn), y)
        check_loss(loss, bi)
        grads = torch.autograd.grad(loss, params)
        gw = structures.reduce({n: (g * w).detach() for n, g, w in zip(names, grads, params)})
        acc += (len(y) / total) * gw.pow(2).cpu()
    distributed.all_reduce(acc, group)
    return {"scores": acc, "info": {}}


def random_scores(structures: StructureSet, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(structures.num_structures, generator=gen, dtype=torch.float64)
