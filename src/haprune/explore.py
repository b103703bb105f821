"""The explore step: one sensitivity pass, then a one-shot pruned model per target, measured on held-out data.

A user who does not know whether 40 %, 50 % or 70 % is right wants accuracy against parameters, FLOPs and latency
remaining, then to pick. :func:`explore` takes the scores (one :class:`~haprune.estimate.Sensitivity` per
criterion: the chosen one, and optionally a cheap baseline such as L2) and, for every target, calls the caller's
plan -> prune -> evaluate steps (the same functions ``haprune prune`` runs, so a point of the curve is exactly the
model a prune run at that target starts fine-tuning from), counts parameters and FLOPs, and times the deployed
model against the dense one. Each point is written atomically into ``state_dir`` as soon as it is measured, so an
interrupted exploration resumes where it stopped.

The sensitivity pass is the expensive part; :class:`SensitivityCache` keeps it on disk under a key that hashes
everything that determines it (see :func:`sensitivity_key`), so ``haprune prune --target X`` after an exploration
of the same model, data and options plans from the same scores without recomputing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ._fileio import atomic_save_safetensors, atomic_write_json
from .estimate import Sensitivity
from .graph import StructureSet
from .plan import Plan
from .report import format_table, model_costs

EXPLORE_VERSION = 1
EXPLORE_FILE = "explore.json"
SENSITIVITY_FILE = "sensitivity.safetensors"
KEY_META = "haprune.sensitivity_key"

__all__ = ["EXPLORE_VERSION", "EXPLORE_FILE", "SENSITIVITY_FILE", "sensitivity_key", "tensors_digest",
           "save_sensitivity", "load_sensitivity", "SensitivityCache", "default_cache_dir", "explore",
           "point_widths", "explore_table", "find_point"]


# ---------------------------------------------------------------------------------------------------- cache

def sensitivity_key(parts: Mapping[str, Any]) -> str:
    """A hash (32 hex digits) of ``parts``: every input that determines a sensitivity pass (the model's weights
    digest, the calibration batches' digest, the structures, the criterion and its options, the seed, the device
    and the software versions). JSON with sorted keys, so the order of ``parts`` does not matter."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the dtypes, shapes and bytes of ``tensors`` (e.g. the calibration batches), in order."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _layout(structures: StructureSet) -> list[list[Any]]:
    return [[g.name, g.size] for g in structures]


def save_sensitivity(path: str | os.PathLike[str], sens: Sensitivity, structures: StructureSet, *,
                     key: str, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``sens`` (scores, and trace / stderr where present, exactly) to a safetensors file, atomically,
    stamped with its cache ``key``, the structures it scores and ``meta`` (what the key was made of)."""
    tensors = {"scores": sens.scores.detach().cpu()}
    for name in ("trace", "stderr"):
        value = getattr(sens, name)
        if value is not None:
            tensors[name] = value.detach().cpu()
    metadata = {KEY_META: key, "criterion": sens.criterion, "info": json.dumps(sens.info, default=str),
                "structures": json.dumps(_layout(structures)), "meta": json.dumps(meta or {}, default=str)}
    atomic_save_safetensors(tensors, path, metadata)


def load_sensitivity(path: str | os.PathLike[str], structures: StructureSet, *, key: str | None = None) -> Sensitivity:
    """Read a file of :func:`save_sensitivity`. Raises ValueError when it is unreadable, scores other structures,
    or (when ``key`` is given) was computed under another key."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ValueError(f"{path} is not a readable sensitivity file ({type(e).__name__}: {e})") from None
    if key is not None and metadata.get(KEY_META) != key:
        raise ValueError(f"{path} holds the sensitivity of another model, data or options (key "
                         f"{metadata.get(KEY_META)}, expected {key})")
    try:
        layout = json.loads(metadata.get("structures", "null"))
        info = json.loads(metadata.get("info", "{}"))
    except ValueError:
        raise ValueError(f"{path}: damaged metadata") from None
    if layout != _layout(structures) or "scores" not in tensors \
            or tensors["scores"].shape != (structures.num_structures,):
        raise ValueError(f"{path} scores other structures than this model's ({structures.num_structures} in "
                         f"{len(structures.names)} groups)")
    return Sensitivity(metadata.get("criterion", ""), tensors["scores"], tensors.get("trace"), tensors.get("stderr"),
                       info)


def default_cache_dir() -> Path:
    """``$HAPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/haprune``, else ``~/.cache/haprune``."""
    if os.environ.get("HAPRUNE_CACHE_DIR"):
        return Path(os.environ["HAPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "haprune"


class SensitivityCache:
    """Sensitivity passes on disk, one safetensors file per key under ``root/sensitivity/``."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"a cache key is alphanumeric, got {key!r}")
        return self.root / "sensitivity" / f"{key}.safetensors"

    def get(self, key: str, structures: StructureSet) -> Sensitivity | None:
        """The cached pass of ``key``, or None (absent, or damaged: then it is recomputed and overwritten)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return load_sensitivity(path, structures, key=key)
        except ValueError:
            return None

    def put(self, key: str, sens: Sensitivity, structures: StructureSet, meta: Mapping[str, Any] | None = None) -> Path:
        path = self.path(key)
        save_sensitivity(path, sens, structures, key=key, meta=meta)
        return path


# ---------------------------------------------------------------------------------------------------- explore

def point_widths(plan: Plan) -> dict[str, list[int]]:
    """Per group: [size, removed, implanted] channel counts of ``plan``."""
    return {name: [g.size, len(g.remove), len(g.implant)] for name, g in plan.groups.items()}


def _point_file(state_dir: Path, label: str, target: float) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in label)
    return state_dir / f"point-{safe}-{round(target * 1e6):07d}.json"


def explore(
    sensitivities: Mapping[str, Sensitivity],
    targets: Sequence[float],
    *,
    dense: nn.Module,
    example: torch.Tensor,
    plan_fn: Callable[[Sensitivity, float], Plan],
    prune_fn: Callable[[Plan], nn.Module],
    evaluate_fn: Callable[[nn.Module], float],
    latency_fn: Callable[[nn.Module], Mapping[str, Mapping[str, float]]] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One point per (criterion label, target): plan, one-shot pruned model, accuracy, size and speed.

    Args:
        sensitivities: label -> scores; every label is explored at every target (e.g. ``{"ggn": ..., "l2": ...}``).
        plan_fn: ``(sensitivity, target) -> Plan``; prune_fn: ``plan -> pruned model`` (surgery and whatever
            recalibration the caller does: BatchNorm re-estimation, compensation); the dense model must stay
            unchanged. evaluate_fn: ``model -> accuracy`` (on held-out data).
        latency_fn: ``pruned -> {"dense": {...}, "pruned": {...}}`` (entries of
            :func:`haprune.report.measure_latency`, timed together); None: no latency.
        state_dir: each finished point is written there atomically and read back on the next call with the same
            folder (resume); the caller keys the folder by every setting, so a stale point is never reused.
    Returns the points in order: label, target, plan (dict), widths, accuracy, params / flops (after, and fraction
    remaining), latency (dense and pruned medians, fraction remaining), seconds, or ``error`` when the planner
    could not reach a target (the other targets still run).
    """
    from tqdm.auto import tqdm

    from .plan import BudgetError

    say = log or (lambda msg: None)
    state = Path(state_dir) if state_dir is not None else None
    if state is not None:
        state.mkdir(parents=True, exist_ok=True)
    base = model_costs(dense, example)
    jobs = [(label, float(t)) for label in sensitivities for t in targets]
    points: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="explore", unit="target", disable=not progress, dynamic_ncols=True)
    for label, target in bar:
        bar.set_postfix_str(f"{label} {100 * target:g}%")
        file = _point_file(state, label, target) if state is not None else None
        if file is not None and file.is_file():
            try:
                point = json.loads(file.read_text(encoding="utf-8"))
                if point.get("label") == label and point.get("target") == target:
                    say(f"explore: {label} at {100 * target:g}% resumed from {file.name}")
                    points.append(point)
                    continue
            except ValueError:
                pass  # a damaged point is measured again
        start = time.perf_counter()
        point: dict[str, Any] = {"label": label, "criterion": sensitivities[label].criterion, "target": target}
        try:
            plan = plan_fn(sensitivities[label], target)
        except BudgetError as e:
            point["error"] = str(e)
            say(f"explore: {label} at {100 * target:g}%: {e}")
        else:
            pruned = prune_fn(plan)
            accuracy = evaluate_fn(pruned)
            costs = model_costs(pruned, example)
            point.update(plan=plan.to_dict(), widths=point_widths(plan), counts=plan.counts(), accuracy=accuracy,
                         params={"after": costs["params"], "remaining": costs["params"] / base["params"]},
                         flops={"after": costs["flops"], "remaining": costs["flops"] / max(1, base["flops"])})
            if latency_fn is not None:
                lat = latency_fn(pruned)
                point["latency"] = {"dense_ms": lat["dense"]["median_ms"], "pruned_ms": lat["pruned"]["median_ms"],
                                    "remaining": lat["pruned"]["median_ms"] / lat["dense"]["median_ms"],
                                    "pruned": dict(lat["pruned"]), "dense": dict(lat["dense"])}
            del pruned
        point["seconds"] = round(time.perf_counter() - start, 3)
        if file is not None:
            atomic_write_json(file, point, allow_nan=False)
        points.append(point)
    bar.close()
    return points


def find_point(result: Mapping[str, Any], target: float, label: str | None = None) -> dict[str, Any]:
    """The point of an explore result at ``target`` (of the first label, or ``label``); KeyError listing the
    targets explored when there is none."""
    label = label or result["labels"][0]
    for point in result["points"]:
        if point["label"] == label and abs(point["target"] - target) < 1e-9:
            return point
    have = sorted({p["target"] for p in result["points"] if p["label"] == label})
    raise KeyError(f"no {label} point at target {target}; explored: {', '.join(f'{t:g}' for t in have)}")


def explore_table(result: Mapping[str, Any]) -> str:
    """The points as a plain text table (accuracy and what remains, in percent)."""
    pct = lambda v: None if v is None else round(100 * v, 2)  # noqa: E731
    dense = result["dense"]
    rows = [{"criterion": "dense", "target %": 0, "accuracy %": pct(dense["accuracy"]), "params %": 100.0,
             "FLOPs %": 100.0, "latency %": 100.0 if dense.get("latency") else None, "ms": (dense.get("latency") or {}).get("median_ms")}]
    for p in result["points"]:
        rows.append({"criterion": p["label"], "target %": round(100 * p["target"], 2),
                     "accuracy %": pct(p.get("accuracy")), "params %": pct((p.get("params") or {}).get("remaining")),
                     "FLOPs %": pct((p.get("flops") or {}).get("remaining")),
                     "latency %": pct((p.get("latency") or {}).get("remaining")),
                     "ms": (p.get("latency") or {}).get("pruned_ms"),
                     "note": "unreachable: " + p["error"][:60] if p.get("error") else None})
    cols = ["criterion", "target %", "accuracy %", "params %", "FLOPs %", "latency %", "ms"]
    if any(r.get("note") for r in rows):
        cols.append("note")
    return format_table(rows, cols)
