"""Report: what pruning did, measured on the models themselves.

* :func:`count_params` and :func:`count_flops` measure any model (pruned, implanted, or one haprune never saw)
  with the conventions of :class:`~haprune.plan.CostModel`, so they cross-check the planner's predictions.
* :func:`measure_latency` times several models fairly (interleaved rounds, one shared thread setting).
* :func:`structure_table` / :func:`format_table` print a plan group by group.
* :func:`build_report` assembles ``report.json``; :func:`write_report` writes it atomically;
  :mod:`haprune.report_html` renders it (and an exploration) as one self-contained ``report.html``.
"""
from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._fileio import atomic_write_json
from .graph import StructureSet, eval_mode, run_forward
from .plan import Plan, batch_size, layer_macs, module_macs
from .threads import num_threads  # re-exported: callers import it from here

if TYPE_CHECKING:
    from .estimate import Sensitivity

REPORT_VERSION = 1
STRUCTURE_COLUMNS = ("name", "size", "kept", "implanted", "removed")

__all__ = [
    "REPORT_VERSION",
    "STRUCTURE_COLUMNS",
    "count_params",
    "count_flops",
    "model_costs",
    "measure_latency",
    "num_threads",
    "structure_table",
    "format_table",
    "build_report",
    "write_report",
    "sensitivity_summary",
    "jsonable",
    "versions",
]


# ---------------------------------------------------------------------------------------------------- size

def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of all Conv and Linear layers for ONE sample of ``example_inputs``.

    Measured with forward hooks (:func:`haprune.plan.module_macs`, the counter the planner's
    :class:`~haprune.plan.CostModel` uses too), so it counts what actually runs: every ``nn.Conv*d`` (grouped and depthwise
    included: output elements x in_channels / groups x kernel area; transposed: input elements x weights per
    input channel), and every ``nn.Linear`` (output elements x in_features), including the convs inside an
    ImplantConv2d; a layer called twice counts twice. Element-wise ops, norms and pooling are not counted (the
    pruning literature's convention, and :class:`~haprune.plan.CostModel`'s). The batch size is the first
    dimension of the first input tensor. The model runs once in eval mode; its mode is restored.
    """
    return sum(module_macs(model, example_inputs).values()) // batch_size(example_inputs)


# the counting rules live with the cost model (haprune.plan), so that planner and report count alike


def model_costs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """``{"params": count_params(model), "flops": count_flops(model, example_inputs)}``."""
    return {"params": count_params(model), "flops": count_flops(model, example_inputs)}


# ---------------------------------------------------------------------------------------------------- latency

def measure_latency(models: Mapping[str, nn.Module], example_input: Any, *, threads: int | None = None,
                    repeats: int = 30, warmup: int = 5) -> dict[str, dict[str, float]]:
    """Time one forward pass of each model on ``example_input``: ``{name: {median_ms, p10_ms, p90_ms}}``.

    Rounds are interleaved: each round runs every model once, the order rotating from round to round, so that
    machine noise (frequency scaling, other processes) hits all models alike. ``warmup`` rounds are run and
    discarded first. Runs under ``torch.inference_mode`` in eval mode (each model's mode is restored). When
    ``threads`` is given, ``torch.set_num_threads(threads)`` holds during the measurement and the previous
    value is restored. On CUDA inputs the device is synchronised around every call.
    """
    if not models:
        raise ValueError("measure_latency needs at least one model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(models)
    sync = _synchronizer(example_input)
    times: dict[str, list[float]] = {n: [] for n in names}
    with eval_mode(*models.values()), num_threads(threads), torch.inference_mode():
        for r in range(warmup + repeats):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                elapsed = _time_once(models[name], example_input, sync)
                if r >= warmup:
                    times[name].append(elapsed)
    return {n: _summary_ms(times[n]) for n in names}


def _synchronizer(example_input: Any) -> Callable[[], None]:
    """A function that waits for the input's CUDA device, or does nothing on the CPU."""
    tensors = [example_input] if isinstance(example_input, torch.Tensor) else (
        list(example_input.values()) if isinstance(example_input, Mapping) else list(example_input))
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda), None)
    if device is None:
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


def _time_once(model: nn.Module, example_input: Any, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    run_forward(model, example_input)
    sync()
    return time.perf_counter() - start


def _summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90)}


# ---------------------------------------------------------------------------------------------------- tables

def structure_table(plan: Plan) -> list[dict[str, Any]]:
    """One row per group of ``plan``: name, size, kept, implanted, removed (channel counts)."""
    return [{"name": name, "size": g.size, "kept": len(g.keep), "implanted": len(g.implant),
             "removed": len(g.remove)} for name, g in plan.groups.items()]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table: a header, a rule, one line per row; numbers right-aligned, text left-aligned.

    Floats are shown with 4 significant digits, missing values and None as ``-``.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    numeric = [all(_is_number(row.get(c)) or row.get(c) is None for row in rows) for c in columns]
    widths = [max([len(str(c))] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in columns]), line(["-" * w for w in widths])]
    out.extend(line(values) for values in cells)
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------- report

def build_report(
    *,
    model: str | Mapping[str, Any],
    plan: Plan,
    costs_before: Mapping[str, int],
    costs_after: Mapping[str, int],
    sensitivity: Sensitivity | None = None,
    accuracy_before: float | None = None,
    accuracy_oneshot: float | None = None,
    accuracy_finetuned: float | None = None,
    latency_before: Mapping[str, float] | None = None,
    latency_after: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
    started_at: datetime | None = None,
    structures: StructureSet | None = None,
) -> dict[str, Any]:
    """Assemble the JSON-ready content of ``report.json``.

    Args:
        model: the model's name, or a dict describing it (name, constructor arguments, ...).
        costs_before, costs_after: ``{"params": int, "flops": int}`` of the dense and the pruned model, as
            measured by :func:`model_costs` (FLOPs are per sample).
        sensitivity: the :class:`~haprune.estimate.Sensitivity` the plan was made from (summarised, not copied).
        accuracy_*: top-1 accuracy of the dense model, of the pruned model before and after fine-tuning.
        latency_before, latency_after: one entry of :func:`measure_latency`'s result each.
        settings: the run's options (target, budget, seed, ...), recorded as given.
        started_at: when the run began (timezone-aware); the report records it and the finishing time.
        structures: the structures ``sensitivity`` scores; given, the sensitivity section holds the distribution
            of the scores of each group (:func:`sensitivity_summary`), for the report page.
    Non-finite floats become None (JSON has no NaN).
    """
    finished = datetime.now(timezone.utc)
    report = {
        "report_version": REPORT_VERSION,
        "model": {"name": model} if isinstance(model, str) else dict(model),
        "sensitivity": {**_sensitivity_section(plan, sensitivity),
                        **(sensitivity_summary(sensitivity, structures) if sensitivity is not None and structures
                           is not None else {})},
        "plan": _plan_section(plan),
        "params": _before_after(costs_before["params"], costs_after["params"]),
        "flops": _before_after(costs_before["flops"], costs_after["flops"]),
        "accuracy": {"before": accuracy_before, "after_oneshot": accuracy_oneshot,
                     "after_finetune": accuracy_finetuned},
        "latency": _latency_section(latency_before, latency_after),
        "settings": dict(settings or {}),
        "versions": versions(),
        "timestamps": {"started": started_at.isoformat() if started_at else None, "finished": finished.isoformat(),
                       "seconds": round((finished - started_at).total_seconds(), 3) if started_at else None},
    }
    return jsonable(report)


def write_report(path: str | os.PathLike[str], report: Mapping[str, Any]) -> None:
    """Write ``report`` as JSON to ``path`` atomically (non-finite floats become null)."""
    atomic_write_json(path, jsonable(report))


def versions() -> dict[str, str | None]:
    """Versions of the software that produced a result."""
    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"haprune": dist("haprune"), "torch": torch.__version__, "torch_pruning": dist("torch-pruning"),
            "python": platform.python_version(), "platform": platform.platform()}


def _sensitivity_section(plan: Plan, sensitivity: Sensitivity | None) -> dict[str, Any]:
    section: dict[str, Any] = {"criterion": plan.criterion or None, "seed": plan.seed}
    if sensitivity is None:
        return section
    scores = sensitivity.scores.double()
    section.update(criterion=sensitivity.criterion, structures=int(scores.numel()), info=dict(sensitivity.info),
                   has_trace=sensitivity.trace is not None, has_stderr=sensitivity.stderr is not None)
    if scores.numel():
        section["score_quantiles"] = dict(zip(("min", "p10", "median", "p90", "max"), torch.quantile(
            scores, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)).tolist()))
    return section


QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


def sensitivity_summary(sensitivity: Sensitivity, structures: StructureSet) -> dict[str, Any]:
    """``{"per_group": {group: {"n", "min", "q1", "median", "q3", "max"}}}``: the distribution of the scores of
    each group's structures (what the report page draws as one box per layer)."""
    per_group = {}
    for name, scores in structures.split(sensitivity.scores.double().cpu()).items():
        if scores.numel():
            q = torch.quantile(scores, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
            per_group[name] = {"n": int(scores.numel()), **dict(zip(("min", "q1", "median", "q3", "max"), q))}
    return {"per_group": per_group}


def _plan_section(plan: Plan) -> dict[str, Any]:
    return {"target": plan.target, "budget": plan.budget, "implant_kind": plan.implant_kind,
            "achieved": dict(plan.achieved), "counts": plan.counts(), "groups": structure_table(plan)}


def _before_after(before: int, after: int) -> dict[str, Any]:
    ratio = after / before if before else None
    return {"before": int(before), "after": int(after), "ratio": ratio,
            "removed": 1.0 - ratio if ratio is not None else None}


def _latency_section(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, Any]:
    speedup = None
    if before and after and after.get("median_ms"):
        speedup = before["median_ms"] / after["median_ms"]
    return {"before": dict(before) if before else None, "after": dict(after) if after else None,
            "speedup": speedup}


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types: tensors and numpy values become lists / numbers, NaN becomes None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
