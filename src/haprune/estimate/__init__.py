"""Estimate: per-structure sensitivity, the first step of estimate -> plan -> apply -> recover -> report.

One entry point, :func:`estimate`, and a string-addressable set of criteria (:data:`CRITERIA`):

| name | what | per-structure value |
|---|---|---|
| ``auto`` (default) | ``ggn`` where it is the exact Hessian (every op piecewise linear in each parameter, cross-entropy, at most ``auto_max_classes`` classes), else ``hutchinson`` | as chosen |
| ``hutchinson`` | the paper: Rademacher probes, double-backward HVPs, stops when the ranking is stable (split-half reliability) | score rule on Tr(H_s) |
| ``ggn`` | exact Gauss-Newton diagonal from per-sample Jacobians | score rule on Tr(GGN_s) |
| ``fisher`` | Fisher diagonal, labels sampled (importance-sampled pairs by default) | score rule |
| ``empirical_fisher`` | Fisher diagonal with the true labels (Fisher / OBD) | score rule (default ``obd``) |
| ``l1`` / ``l2`` | sum of \\|w\\| / w^2 over the structure | magnitude |
| ``taylor`` | (sum_s g w)^2, averaged over batches | first order |
| ``random`` | uniform, seeded | chance |

Score rules for curvature criteria: ``hap`` (Tr(H_s)/n_s * ||w_s||^2, the paper) or ``obd`` (1/2 sum H_ii w_i^2).
The model is evaluated in eval mode (BatchNorm running statistics, as in the paper) and is not modified.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..graph import StructureSet
from .base import (
    SCORE_RULES,
    Batch,
    CalibrationDataError,
    LossFn,
    Sensitivity,
    apply_score_rule,
    default_loss,
    eval_mode,
    materialise_batches,
    model_device,
)
from .curvature import fisher, ggn, hutchinson, nonlinear_ops
from .simple import magnitude, random_scores, taylor

CRITERIA = ("auto", "hutchinson", "ggn", "fisher", "empirical_fisher", "l1", "l2", "taylor", "random")
CURVATURE = ("hutchinson", "ggn", "fisher", "empirical_fisher")

__all__ = ["estimate", "Sensitivity", "CRITERIA", "SCORE_RULES", "CalibrationDataError", "choose_auto",
           "nonlinear_ops"]


def choose_auto(model: nn.Module, batches: list[Batch], loss: str, max_classes: int) -> tuple[str, str]:
    """The criterion ``auto`` resolves to, and why."""
    x, _ = batches[0]
    with torch.no_grad():
        k = model(x[:1]).shape[-1]
    bad = nonlinear_ops(model, x[:1])
    if loss != "cross_entropy":
        return "hutchinson", f"loss {loss!r}: the GGN shortcut is only wired for cross-entropy here"
    if bad:
        return "hutchinson", f"ops not piecewise linear in each parameter ({', '.join(bad[:5])}): GGN is not exact"
    if k > max_classes:
        return "fisher", f"{k} classes > {max_classes}: exact GGN costs a backward per class; sampled Fisher instead"
    return "ggn", "every op is piecewise linear in each parameter: the GGN diagonal is the exact Hessian diagonal"


def _accepted(criterion: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options the chosen criterion's function takes (``auto`` may resolve to any of them)."""
    fn = {"hutchinson": hutchinson, "ggn": ggn, "fisher": fisher}.get(criterion)
    if fn is None:
        return {}
    names = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in names}


def estimate(
    model: nn.Module,
    structures: StructureSet,
    batches: Iterable[Batch],
    criterion: str = "auto",
    *,
    score: str | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    num_batches: int | None = None,
    progress: bool = True,
    auto_max_classes: int = 100,
    **options: Any,
) -> Sensitivity:
    """Score every structure of ``structures`` on ``model`` with ``criterion``.

    Args:
        batches: calibration (inputs, targets) pairs; the first ``num_batches`` are used (all if None).
        score: score rule for curvature criteria, ``hap`` (default) or ``obd`` (default for empirical_fisher).
        loss_fn: ``f(logits, targets) -> scalar``; default cross-entropy. With a custom loss, ``auto`` uses
            Hutchinson (the GGN shortcut assumes cross-entropy).
        options: passed to the criterion (``max_probes``, ``tol``, ``min_probes`` for hutchinson;
            ``chunk_size``/``memory_budget_mb`` for ggn and fisher; ``samples_per_input`` (may be a fraction)
            and ``sampling`` (``importance`` or ``multinomial``) for fisher).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    device = model_device(model)
    data = materialise_batches(batches, device, num_batches)
    loss_name = "cross_entropy" if loss_fn is None else "custom"
    loss_fn = loss_fn or default_loss
    start = time.perf_counter()
    info: dict[str, Any] = {"batches": len(data), "samples": sum(len(y) for _, y in data)}
    with eval_mode(model):
        if criterion == "auto":
            criterion, why = choose_auto(model, data, loss_name, auto_max_classes)
            info["auto"] = {"chose": criterion, "why": why}
            options = _accepted(criterion, options)  # e.g. max_probes only matters if auto chose hutchinson
        info["exact"] = False
        result: dict[str, Any]
        if criterion == "hutchinson":
            result = hutchinson(model, structures, data, loss_fn=loss_fn, seed=seed, progress=progress, **options)
        elif criterion == "ggn":
            result = ggn(model, structures, data, progress=progress, **options)
            info["exact"] = not nonlinear_ops(model, data[0][0][:1])
        elif criterion in ("fisher", "empirical_fisher"):
            labels = "true" if criterion == "empirical_fisher" else "sampled"
            result = fisher(model, structures, data, labels=labels, seed=seed, progress=progress, **options)
            score = score or ("obd" if criterion == "empirical_fisher" else None)
        elif criterion in ("l1", "l2"):
            result = {"scores": magnitude(model, structures, 1 if criterion == "l1" else 2)}
        elif criterion == "taylor":
            result = taylor(model, structures, data, loss_fn=loss_fn)
        else:
            result = {"scores": random_scores(structures, seed)}
        if criterion in CURVATURE:
            score = score or "hap"
            info["score_rule"] = score
            scores = apply_score_rule(score, model, structures, result["trace"].to(torch.float64),
                                      result.get("diag"))
        else:
            if score is not None:
                raise ValueError(f"score rule {score!r} applies to curvature criteria {CURVATURE}, not {criterion!r}")
            scores = result["scores"]
    info.update(result.get("info", {}))
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Sensitivity(criterion, scores.double().cpu(), result.get("trace"), result.get("stderr"), info)
