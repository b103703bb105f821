"""The estimate step's data model and shared helpers.

Every criterion turns (model, structures, calibration batches) into one number per structure, higher meaning
"more important, keep". Curvature criteria first produce a per-parameter Hessian (or Fisher) diagonal estimate and
per-structure block traces; a *score rule* then combines curvature and weights:

- ``hap``: Tr(H_s) / n_s * ||w_s||^2, the paper's score (n_s = parameters in the structure).
- ``obd``: 1/2 * sum_{i in s} H_ii * w_i^2, the second-order loss change of zeroing s with a diagonal Hessian
  (exact where the diagonal is exact; Optimal Brain Damage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph import StructureSet, eval_mode, model_device  # noqa: F401  (re-exported)

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCORE_RULES = ("hap", "obd")


class CalibrationDataError(ValueError):
    """The calibration batches are empty or produce a non-finite loss."""


@dataclass
class Sensitivity:
    """Per-structure importance from one criterion, as a flat vector in ``structures`` order.

    ``trace`` (Tr(H_s)) and ``stderr`` (its standard error) are set by curvature criteria; ``stderr`` only by
    stochastic ones. ``info`` records what was done: probes, samples, seconds, whether the trace is exact.
    """

    criterion: str
    scores: torch.Tensor
    trace: torch.Tensor | None = None
    stderr: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def per_group(self, structures: StructureSet) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in structures.split(self.scores).items()}

    def to_json(self, structures: StructureSet) -> dict[str, Any]:
        """A JSON-ready dict keyed by group (root module fully-qualified name)."""
        groups = {}
        for g in structures:
            sl = slice(structures.offsets[g.name], structures.offsets[g.name] + g.size)
            entry = {"score": self.scores[sl].tolist()}
            if self.trace is not None:
                entry["trace"] = self.trace[sl].tolist()
            if self.stderr is not None:
                entry["stderr"] = self.stderr[sl].tolist()
            groups[g.name] = entry
        return {"criterion": self.criterion, "info": self.info, "groups": groups}


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def materialise_batches(batches: Iterable[Batch], device: torch.device, limit: int | None = None) -> list[Batch]:
    """Move calibration batches to ``device`` once and check them."""
    out: list[Batch] = []
    for i, b in enumerate(batches):
        if limit is not None and i >= limit:
            break
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise CalibrationDataError("calibration batches must be (inputs, targets) pairs")
        x, y = b
        if not torch.isfinite(x).all():
            raise CalibrationDataError(f"calibration batch {i} holds NaN or infinite inputs; clean the data")
        out.append((x.to(device), y.to(device)))
    if not out:
        raise CalibrationDataError("no calibration batches: pass at least one (inputs, targets) batch")
    return out


def check_loss(loss: torch.Tensor, batch_index: int) -> None:
    if not torch.isfinite(loss):
        raise CalibrationDataError(
            f"the loss on calibration batch {batch_index} is {loss.item()}; check the model and data "
            "(NaN weights? labels out of range?)"
        )


def structure_params(model: nn.Module, structures: StructureSet) -> tuple[list[str], list[nn.Parameter]]:
    named = dict(model.named_parameters())
    names = [n for n in structures.param_names() if n in named]
    missing = [n for n in structures.param_names() if n not in named]
    if missing:
        raise ValueError(f"structures were built for another model: parameters {missing[:3]} are missing")
    return names, [named[n] for n in names]


def weight_sq(model: nn.Module, structures: StructureSet) -> dict[str, torch.Tensor]:
    names, params = structure_params(model, structures)
    return {n: p.detach().double() ** 2 for n, p in zip(names, params)}


def apply_score_rule(rule: str, model: nn.Module, structures: StructureSet, trace: torch.Tensor,
                     diag: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Combine per-structure traces (and the per-element diagonal) with the weights into importance scores."""
    wsq = weight_sq(model, structures)
    if rule == "hap":
        numel = structures.numel().to(trace.device)
        return trace * structures.reduce(wsq).to(trace.device) / numel
    if rule == "obd":
        if diag is None:
            raise ValueError("score rule 'obd' needs a per-element diagonal; this criterion gives none")
        return 0.5 * structures.reduce({n: diag[n].double() * wsq[n].to(diag[n].device) for n in diag})
    raise ValueError(f"unknown score rule {rule!r}; choose one of {', '.join(SCORE_RULES)}")


def relative_stderr(mean: torch.Tensor, m2: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of a Welford mean, relative to max(|mean|, 1e-3 * mean |mean|)."""
    if n < 2:
        return torch.full_like(mean, math.inf)
    se = (m2 / (n - 1) / n).sqrt()
    floor = 1e-3 * mean.abs().mean().clamp_min(1e-30)
    return se / mean.abs().clamp_min(floor)
