"""Estimate: per-structure sensitivity, the first step of estimate -> plan -> apply -> recover -> report.

One entry point, :func:`estimate`, and a string-addressable set of criteria (:data:`CRITERIA`):

| name | what | per-structure value |
|---|---|---|
| ``auto`` (default) | ``ggn`` where it is the exact Hessian (every op piecewise linear in each parameter, cross-entropy, at most ``auto_max_classes`` classes), else the importance-sampled ``fisher`` (best ranking per second where the GGN is not exact); ``hutchinson`` only for a custom loss, after a one-sample double-backward trial; time-bounded (``time_budget``) | as chosen |
| ``hutchinson`` | the paper: Rademacher probes, double-backward HVPs, stops when the ranking is stable (split-half reliability) | score rule on Tr(H_s) |
| ``ggn`` | exact Gauss-Newton diagonal from per-sample Jacobians | score rule on Tr(GGN_s) |
| ``fisher`` | Fisher diagonal, labels sampled (importance-sampled pairs by default) | score rule |
| ``empirical_fisher`` | Fisher diagonal with the true labels (Fisher / OBD) | score rule (default ``obd``) |
| ``l1`` / ``l2`` | sum of \\|w\\| / w^2 over the structure | magnitude |
| ``taylor`` | (sum_s g w)^2, averaged over batches | first order |
| ``random`` | uniform, seeded | chance |
| ``obs`` | structured Optimal Brain Surgeon saliency from each consumer layer's input Gram matrix H: sum_o w_s^T [(H^-1)_ss]^-1 w_s, the reconstruction error the refit of :func:`haprune.apply.compensate.compensate` cannot recover | layer-local |
| ``obs-ggn`` | ``obs`` with each consumer output weighted by its loss curvature (from the exact GGN diagonal), in loss units | layer-local x global |

Score rules for curvature criteria: ``hap`` (Tr(H_s)/n_s * ||w_s||^2, the paper) or ``obd`` (1/2 sum H_ii w_i^2).
The model is evaluated in eval mode (BatchNorm running statistics, as in the paper) and is not modified.

Every criterion runs the same checks (:mod:`.base`): parameters and buffers finite (naming the tensors) and the
first batch's output and loss finite, labels in range, predictions not saturated, all before the pass; after it,
scores neither non-finite nor all zero. Models returning a ``ModelOutput`` / dict / tuple are read through
:func:`haprune.outputs.logits_of` (or ``output_fn``). Hutchinson switches Hugging Face models with fused (sdpa)
attention to eager attention for its double backward, and restores them.
"""
from __future__ import annotations

import inspect
import sys
import time
from typing import Any, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed
from ..graph import StructureSet
from ..outputs import OutputFn, logits_of
from .base import (
    SCORE_RULES,
    Batch,
    CalibrationDataError,
    LossFn,
    ModelCheckError,
    Sensitivity,
    apply_score_rule,
    check_first_batch,
    check_parameters,
    check_scores,
    default_loss,
    double_backward_error,
    eager_attention,
    eval_mode,
    log,
    materialise_batches,
    model_device,
    structure_params,
)
from .curvature import fisher, ggn, hutchinson, nonlinear_ops
from .obs import consumer_grams, obs_saliency, output_curvature
from .simple import magnitude, random_scores, taylor

CRITERIA = ("auto", "hutchinson", "ggn", "fisher", "empirical_fisher", "l1", "l2", "taylor", "random", "obs",
            "obs-ggn")
CURVATURE = ("hutchinson", "ggn", "fisher", "empirical_fisher")
AUTO_TIME_BUDGET = 300.0  # seconds: ``auto``'s default bound (the chosen estimator stops early, and says so)

__all__ = ["estimate", "Sensitivity", "CRITERIA", "SCORE_RULES", "CalibrationDataError", "ModelCheckError",
           "choose_auto", "nonlinear_ops", "AUTO_TIME_BUDGET"]


def choose_auto(model: nn.Module, batches: list[Batch], loss: str = "cross_entropy", max_classes: int = 100, *,
                loss_fn: LossFn | None = None, output_fn: OutputFn | None = None,
                structures: StructureSet | None = None) -> tuple[str, str, dict[str, Any]]:
    """The criterion ``auto`` resolves to, why, and what was measured to decide (call it in eval mode).

    Ranking quality per second, as measured (docs/results/performance.md): where every op is piecewise linear in
    each parameter the GGN diagonal *is* the Hessian diagonal, exact at about one per-sample gradient pass per
    class, so ``ggn`` (up to ``max_classes`` classes). Elsewhere the importance-sampled ``fisher`` ranks about as
    well for pruning as a long Hutchinson run at 1/100 to 1/1000 of its time (Hutchinson's ranking needs hundreds
    of probes to stabilise, each a double backward), so ``fisher``. Hutchinson only for a custom loss (the GGN and
    Fisher shortcuts are wired for cross-entropy), after a one-sample double-backward trial (Hugging Face models
    switched to eager attention for it), refused with the cause if the model has no second derivative.
    """
    x, y = batches[0]
    with torch.no_grad():
        k = logits_of(model(x[:1]), output_fn).shape[-1]
    bad = nonlinear_ops(model, x[:1], output_fn)
    params = structure_params(model, structures)[1] if structures is not None else \
        [p for p in model.parameters() if p.requires_grad]
    with eager_attention(model, "double-backward trial") as switched:
        err = double_backward_error(model, (x[:1], y[:1]), params, loss_fn or default_loss, output_fn)
    facts: dict[str, Any] = {"classes": k, "non_piecewise_linear_ops": bad[:20],
                             "double_backward": "unsupported: " + err if err else "supported"}
    if switched:
        facts["double_backward"] += " (with eager attention)"
    if loss != "cross_entropy":
        if err:
            raise ModelCheckError(
                f"auto: with a custom loss only Hutchinson applies, and it needs a second derivative, which this "
                f"model does not have ({err}); use criterion 'taylor', 'l2' or 'l1', or the default cross-entropy "
                f"loss (then auto uses the Fisher)")
        return "hutchinson", f"loss {loss!r}: the GGN and Fisher shortcuts are wired for cross-entropy", facts
    if bad and not err:
        return "fisher", (f"ops not piecewise linear in each parameter ({', '.join(bad[:5])}): GGN is not exact; "
                          "the importance-sampled Fisher prunes about as well as Hutchinson (one-shot accuracy, "
                          "docs/results/performance.md) at a small fraction of its time"), facts
    if bad:
        return "fisher", (f"ops not piecewise linear in each parameter ({', '.join(bad[:5])}) and no second "
                          f"derivative for Hutchinson ({err}): importance-sampled Fisher"), facts
    if k > max_classes:
        return "fisher", f"{k} classes > {max_classes}: exact GGN costs a backward per class; sampled Fisher instead", \
            facts
    return "ggn", "every op is piecewise linear in each parameter: the GGN diagonal is the exact Hessian diagonal", \
        facts


def _accepted(criterion: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options the chosen criterion's function takes (``auto`` may resolve to any of them)."""
    fn = {"hutchinson": hutchinson, "ggn": ggn, "fisher": fisher}.get(criterion)
    if fn is None:
        return {}
    names = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in names}


def _check_options(criterion: str, options: dict[str, Any]) -> None:
    """Options no function of ``criterion`` takes are refused before any work (``auto`` takes any curvature
    criterion's)."""
    fns = {"hutchinson": [hutchinson], "ggn": [ggn], "fisher": [fisher], "empirical_fisher": [fisher],
           "auto": [hutchinson, ggn, fisher], "obs": [obs_saliency], "obs-ggn": [obs_saliency]}.get(criterion, [])
    known = {n for fn in fns for n in inspect.signature(fn).parameters} - {
        "model", "structures", "batches", "loss_fn", "seed", "progress", "labels", "output_fn", "time_budget",
        "output_weights", "grams", "group", "batch_ids"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"criterion {criterion!r} takes no option {', '.join(map(repr, unknown))}"
                        + (f"; it takes {', '.join(sorted(known))}" if known else ""))


def estimate(
    model: nn.Module,
    structures: StructureSet,
    batches: Iterable[Batch],
    criterion: str = "auto",
    *,
    score: str | None = None,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    seed: int = 0,
    num_batches: int | None = None,
    progress: bool = True,
    auto_max_classes: int = 100,
    time_budget: float | None = None,
    group: Any = None,
    **options: Any,
) -> Sensitivity:
    """Score every structure of ``structures`` on ``model`` with ``criterion``.

    Args:
        batches: calibration (inputs, targets) pairs; the first ``num_batches`` are used (all if None).
        score: score rule for curvature criteria, ``hap`` (default) or ``obd`` (default for empirical_fisher).
        loss_fn: ``f(logits, targets) -> scalar``; default cross-entropy. With a custom loss, ``auto`` uses
            Hutchinson (the GGN shortcut assumes cross-entropy).
        output_fn: takes the logits from what the model returns, for outputs :func:`haprune.outputs.logits_of`
            does not read by itself (tensors, ``ModelOutput`` / dicts with ``logits``, tuples are read).
        time_budget: seconds the curvature pass may take (hutchinson stops probing, ggn / fisher skip the
            remaining batches, and ``info`` says so); ``None``: unbounded, except for ``auto``, which is bounded
            by :data:`AUTO_TIME_BUDGET` unless a budget is given.
        options: passed to the criterion (``max_probes``, ``tol``, ``min_probes`` for hutchinson;
            ``chunk_size``/``memory_budget_mb`` for ggn and fisher; ``samples_per_input`` (may be a fraction)
            and ``sampling`` (``importance`` or ``multinomial``) for fisher).
        group: a ``torch.distributed`` process group to spread the pass over (e.g.
            :func:`haprune.distributed.init_from_env`'s); None (default): this process alone. Every rank passes the same ``batches`` and model; rank r takes batches r, r + N, ... (of the
            first ``num_batches``), the per-structure sums, counts and second moments are all-reduced, and each
            batch's random stream is seeded by its global position: the scores equal the single-process ones on the
            same batches up to floating-point summation order (:mod:`haprune.distributed`). Every rank returns them.

    Raises:
        CalibrationDataError: no batches, non-finite inputs, labels out of range, a non-finite loss.
        ModelCheckError: non-finite weights (named), a non-finite output, saturated predictions, an op without the
            second derivative Hutchinson needs, all-zero or non-finite scores; all before the pass where possible.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    _check_options(criterion, options)
    if score is not None:
        if criterion not in CURVATURE + ("auto",):
            raise ValueError(f"score rule {score!r} applies to curvature criteria {CURVATURE}, not {criterion!r}")
        if score not in SCORE_RULES:
            raise ValueError(f"unknown score rule {score!r}; choose one of {', '.join(SCORE_RULES)}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget!r}")
    if criterion == "auto" and time_budget is None:
        time_budget = AUTO_TIME_BUDGET
    device = model_device(model)
    shard = list(distributed.shard(batches, group, limit=num_batches, with_index=True))
    batch_ids = [i for i, _ in shard]
    ranks = distributed.world(group)
    fewest = int(distributed.all_reduce_min(torch.tensor([len(shard)]), group).item())
    if ranks > 1 and fewest == 0:
        raise CalibrationDataError(f"{ranks} processes need at least {ranks} calibration batches (one per process, "
                                   "rank r takes batches r, r + N, ...): pass more or smaller batches")
    data = distributed.raise_together(lambda: materialise_batches([b for _, b in shard], device), group)
    loss_name = "cross_entropy" if loss_fn is None else "custom"
    custom_loss = loss_fn
    loss_fn = loss_fn or default_loss
    start = time.perf_counter()
    counts = distributed.all_reduce(torch.tensor([len(data), sum(len(y) for _, y in data)]), group).tolist()
    info: dict[str, Any] = {"batches": counts[0], "samples": counts[1]}
    if ranks > 1:
        info["processes"] = ranks
    with eval_mode(model):
        check_parameters(model)
        _, info["first_batch"] = distributed.raise_together(
            lambda: check_first_batch(model, data[0], custom_loss, output_fn), group)
        if criterion == "auto":
            criterion, why, facts = choose_auto(model, data, loss_name, auto_max_classes, loss_fn=custom_loss,
                                                output_fn=output_fn, structures=structures)
            info["auto"] = {"chose": criterion, "why": why, **facts}
            log.info("auto chose %s: %s", criterion, why)
            if progress and distributed.is_main(group):  # the user watching a progress bar sees the choice too (logging is silent by default)
                tqdm.write(f"haprune estimate: auto chose {criterion}: {why}", file=sys.stderr)
            options = _accepted(criterion, options)  # e.g. max_probes only matters if auto chose hutchinson
        info["exact"] = False
        result: dict[str, Any]
        common = {"progress": progress and distributed.is_main(group), "output_fn": output_fn,
                  "time_budget": time_budget, "group": group}
        if criterion == "hutchinson":
            params = structure_params(model, structures)[1]
            with eager_attention(model) as switched:
                err = double_backward_error(model, data[0], params, loss_fn, output_fn)
                if err:
                    raise ModelCheckError(
                        f"hutchinson needs a second derivative, which this model does not have ({err}); use "
                        "criterion 'fisher' or 'ggn' (first derivatives only) or 'auto'")
                if switched:
                    info["attention"] = "switched to eager for the double backward, restored: " + "; ".join(switched)
                result = hutchinson(model, structures, data, loss_fn=loss_fn, seed=seed, batch_ids=batch_ids,
                                    **common, **options)
        elif criterion == "ggn":
            result = ggn(model, structures, data, **common, **options)
            info["exact"] = not nonlinear_ops(model, data[0][0][:1], output_fn)
        elif criterion in ("fisher", "empirical_fisher"):
            labels = "true" if criterion == "empirical_fisher" else "sampled"
            result = fisher(model, structures, data, labels=labels, seed=seed, batch_ids=batch_ids, **common,
                            **options)
            score = score or ("obd" if criterion == "empirical_fisher" else None)
        elif criterion in ("l1", "l2"):
            result = {"scores": magnitude(model, structures, 1 if criterion == "l1" else 2)}
        elif criterion == "taylor":
            result = taylor(model, structures, data, loss_fn=loss_fn, output_fn=output_fn, group=group)
        elif criterion == "obs":
            result = {"scores": obs_saliency(model, structures, data, progress=common["progress"], group=group,
                                             **options)}
        elif criterion == "obs-ggn":
            curvature = ggn(model, structures, data, **common)
            grams = consumer_grams(model, structures, data, group=group)
            weights = output_curvature(model, structures, curvature["diag"], data, grams=grams, group=group)
            result = {"scores": obs_saliency(model, structures, data, output_weights=weights, grams=grams,
                                             progress=common["progress"], **options), "info": curvature.get("info", {})}
        else:
            result = {"scores": random_scores(structures, seed)}
        if criterion in CURVATURE:
            score = score or "hap"
            info["score_rule"] = score
            scores = apply_score_rule(score, model, structures, result["trace"].to(torch.float64),
                                      result.get("diag"))
        else:
            scores = result["scores"]
    check_scores(scores, criterion, structures)
    info.update(result.get("info", {}))
    info["seconds"] = round(time.perf_counter() - start, 3)
    return Sensitivity(criterion, scores.double().cpu(), result.get("trace"), result.get("stderr"), info)
