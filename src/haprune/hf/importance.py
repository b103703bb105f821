"""Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?", as a baseline.

A gate xi_h multiplies head h's context before the output projection; importance is the expected absolute
gradient of the loss with respect to the gate at xi = 1, accumulated per batch as in the authors' code, then
normalised per layer by the L2 norm. Scaling a unit's context by xi is scaling its output-projection columns by
xi, so dL/dxi_h = sum over those columns of w * dL/dw: no hooks or ``head_mask`` needed, and the same formula
gives FFN neurons' gate importance (their down-projection columns).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..estimate import Sensitivity
from ..estimate.base import Batch, LossFn, check_loss, default_loss, materialise_batches
from ..graph import StructureSet, eval_mode, model_device

__all__ = ["michel_importance", "unit_importance", "UNIT_CRITERIA"]

# name -> what it computes (every one returns a Sensitivity, higher = keep)
UNIT_CRITERIA = {
    "hap": "Tr(H_s)/n_s * ||w_s||^2 with Hutchinson block traces (the paper)",
    "hap-ggn": "the same score on exact Gauss-Newton block traces (positive semi-definite)",
    "michel": "Michel et al. (2019): expected |dL/d gate|, layer-normalised",
    "magnitude": "squared L2 norm of the unit's weights",
    "random": "uniform, seeded",
}


def michel_importance(model: nn.Module, structures: StructureSet, batches: list[Batch], *,
                      loss_fn: LossFn | None = None, normalize_layers: bool = True,
                      num_batches: int | None = None) -> Sensitivity:
    """Michel et al.'s head (and FFN-neuron) importance for every structure of ``structures``."""
    loss_fn = loss_fn or default_loss
    data = materialise_batches(batches, model_device(model), num_batches)
    named = dict(model.named_parameters())
    gates = []  # (group, tensor name) of each group's consumer slice: the output projection's columns
    for g in structures:
        consumer = [s for s in g.param_slices if s.dim == 1 and s.tensor.endswith(".weight")]
        if len(consumer) != 1:
            raise ValueError(f"{g.name}: expected one output-projection slice, found {len(consumer)}")
        gates.append((g, consumer[0]))
    params = [named[s.tensor] for _, s in gates]
    scores = torch.zeros(structures.num_structures, dtype=torch.float64)
    with eval_mode(model):
        for bi, (x, y) in enumerate(data):
            loss = loss_fn(model(x), y)
            check_loss(loss, bi)
            grads = torch.autograd.grad(loss, params)
            for (g, s), w, gr in zip(gates, params, grads):
                per_col = (w.detach() * gr).sum(0).double().cpu()  # dL/d(column scale)
                gate = torch.zeros(g.size, dtype=torch.float64).index_add_(0, s.root_idxs, per_col[s.idxs])
                base = structures.offsets[g.name]
                scores[base: base + g.size] += gate.abs()
    if normalize_layers:
        for g in structures:
            sl = slice(structures.offsets[g.name], structures.offsets[g.name] + g.size)
            norm = scores[sl].norm()
            if norm > 0:
                scores[sl] /= norm
    info: dict[str, Any] = {"batches": len(data), "samples": sum(len(y) for _, y in data),
                            "normalize_layers": normalize_layers}
    return Sensitivity("michel", scores, info=info)


def unit_importance(model: nn.Module, structures: StructureSet, batches: list[Batch], criterion: str, *,
                    seed: int = 0, probes: int = 8, progress: bool = False) -> Sensitivity:
    """Score heads / FFN neurons with one of :data:`UNIT_CRITERIA` (``probes``: Hutchinson probes per batch)."""
    from ..estimate import estimate

    if criterion == "hap":
        return estimate(model, structures, batches, "hutchinson", seed=seed, min_probes=probes,
                        max_probes=probes, progress=progress)
    if criterion == "hap-ggn":
        return estimate(model, structures, batches, "ggn", progress=progress)
    if criterion == "michel":
        return michel_importance(model, structures, batches)
    if criterion == "magnitude":
        return estimate(model, structures, batches, "l2", progress=progress)
    if criterion == "random":
        return estimate(model, structures, batches, "random", seed=seed, progress=progress)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(UNIT_CRITERIA)}")
