"""Plan for transformers: rank attention units and FFN neurons globally, remove the least important, give the
next band a low-rank implant, until a budget is met.

Budgets (``budget``): ``"params"``, the fraction of the prunable blocks' own parameters removed (an implanted
head counts what it still costs), or ``"units"``, the fraction of units removed (an implanted head counts
1 - rank / head_dim of a unit). Every block keeps at least ``min_units`` full units.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..estimate import Sensitivity
from ..graph import StructureSet
from ..plan import BudgetError, GroupPlan, Plan
from .layout import AttentionBlock
from .structures import block_index

__all__ = ["plan_transformer", "BUDGETS"]

BUDGETS = ("params", "units")


def _implant_cost(hidden: int, rank: int) -> int:
    return rank * (4 * hidden + 1)  # query rows with bias, key and value rows, output columns


def plan_transformer(model: nn.Module, structures: StructureSet, sensitivity: Sensitivity | torch.Tensor,
                     target: float, *, budget: str = "params", implant_ratio: float = 0.0,
                     implant_rank: int | None = None, min_units: int = 1) -> Plan:
    """A :class:`Plan` removing ``target`` of the budget, least important structures first.

    ``implant_ratio``: implanted heads per removed unit (the band just above the removal threshold; BERT-family
    attention groups only: a ValueError at plan time when no unit can take one, e.g. on Llama-family models). ``implant_rank``: head dimension of implanted heads (default head_dim // 4).
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be a fraction in (0, 1), got {target}")
    if implant_ratio < 0:
        raise ValueError(f"implant_ratio must be >= 0, got {implant_ratio}")
    scores = sensitivity.scores if isinstance(sensitivity, Sensitivity) else sensitivity
    scores = scores.detach().double().cpu()
    if scores.shape != (structures.num_structures,) or not torch.isfinite(scores).all():
        raise ValueError(f"need {structures.num_structures} finite scores (one per structure), got "
                         f"shape {tuple(scores.shape)}")
    blocks = block_index(model)
    numel = structures.numel()
    gid, cost, icost, names = [], [], [], []
    for g in structures:
        b = blocks[g.name]
        gid += [g.name] * g.size
        names += list(range(g.size))
        unit = numel[structures.offsets[g.name]: structures.offsets[g.name] + g.size].tolist()
        cost += [1.0] * g.size if budget == "units" else unit
        implant = float("nan")  # nan: this unit cannot take an implant
        if isinstance(b, AttentionBlock):
            rank = implant_rank or max(1, b.head_dim // 4)
            if rank > b.head_dim:
                raise ValueError(f"implant_rank {rank} > head_dim {b.head_dim} of {g.name}")
            if b.family == "bert" and b.group_size == 1:
                hidden = model.get_submodule(b.q).in_features
                implant = rank / b.head_dim if budget == "units" else float(_implant_cost(hidden, rank))
        icost += [implant] * g.size
    if implant_ratio > 0 and all(math.isnan(c) for c in icost):
        fams = sorted({getattr(blocks[g.name], "family", "ffn") for g in structures})
        why = ("rotary position embeddings (Llama family) do not commute with a low-rank query/key map, and "
               "grouped key/value heads share their keys" if "llama" in fams else "implants are for BERT-family "
               "attention heads only")
        raise ValueError(f"implant_ratio={implant_ratio} but no unit of these structures can take an implant "
                         f"({', '.join(fams)} blocks): {why}; use implant_ratio=0")
    total = sum(cost)
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    sizes = {g.name: g.size for g in structures}

    def decide(n_remove: int) -> tuple[float, dict[str, list[int]], dict[str, list[int]]]:
        removed: dict[str, list[int]] = {g: [] for g in sizes}
        implanted: dict[str, list[int]] = {g: [] for g in sizes}
        saved, taken, pos = 0.0, 0, 0
        while taken < n_remove and pos < len(order):
            i = order[pos]
            pos += 1
            g = gid[i]
            if sizes[g] - len(removed[g]) - 1 >= min_units:
                removed[g].append(names[i])
                saved += cost[i]
                taken += 1
        want = round(implant_ratio * taken)
        got = 0
        while got < want and pos < len(order):
            i = order[pos]
            pos += 1
            g = gid[i]
            if not math.isnan(icost[i]) and sizes[g] - len(removed[g]) - len(implanted[g]) - 1 >= min_units:
                implanted[g].append(names[i])
                saved += cost[i] - icost[i]
                got += 1
        return saved, removed, implanted

    need = target * total
    lo, hi = 0, len(order)
    if decide(hi)[0] < need:
        raise BudgetError(f"cannot remove {target:.0%} of the {budget}: at most {decide(hi)[0] / total:.1%} with "
                          f"min_units={min_units} per block")
    while lo < hi:  # smallest n_remove whose plan saves enough
        mid = (lo + hi) // 2
        if decide(mid)[0] >= need:
            hi = mid
        else:
            lo = mid + 1
    saved, removed, implanted = decide(lo)
    groups = {g: GroupPlan(size, sorted(removed[g]), sorted(implanted[g])) for g, size in sizes.items()}
    rank_used = implant_rank or 0
    if any(implanted.values()) and not rank_used:
        rank_used = max(1, next(b.head_dim for n, b in blocks.items() if implanted.get(n)) // 4)
    achieved = {f"{budget}_before": total, f"{budget}_after": total - saved, "removed_fraction": saved / total}
    criterion = sensitivity.criterion if isinstance(sensitivity, Sensitivity) else ""
    return Plan(groups, implant_kind="lowrank", target=target, budget=budget, achieved=achieved,
                criterion=criterion, implant_rank=rank_used)
