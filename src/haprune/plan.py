"""Plan: which structures to keep, implant or remove, as a plain JSON-serialisable object.

:func:`make_plan` ranks all structures globally by score and removes the least important ones until the target
fraction of parameters (or FLOPs) is removed, within one percentage point, while honouring a hard per-group
maximum removal ratio and a minimum number of channels. The next band of structures above the removal threshold
(``implant_ratio`` times the number removed, among structures that can take one) gets a Neural Implant
instead: its k x k convolution rows become a cheaper 1 x 1 (or separable) convolution. Unlike the official
code, the budget counts the implants' own cost, so the plan's size is the pruned model's size.

The cost model (:class:`CostModel`) is exact: every tensor's size is the product of its dimensions, each
coupled dimension shrinking with the kept channels of its group; FLOPs are multiply-accumulates of Conv and
Linear layers (the convention of the pruning literature) at the example input's resolution.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from .graph import StructureSet, channel_widths, forward_with_hooks

if TYPE_CHECKING:
    from .latency import LatencyTable

IMPLANT_KINDS = ("1x1", "separable")  # CNN implants; haprune.hf plans use "lowrank" (attention heads)
PLAN_VERSION = 1


class BudgetError(ValueError):
    """The target cannot be met under the plan's constraints."""


@dataclass
class GroupPlan:
    """Decisions for one group (keyed in :class:`Plan` by the root module's fully-qualified name)."""

    size: int
    remove: list[int] = field(default_factory=list)
    implant: list[int] = field(default_factory=list)

    @property
    def keep(self) -> list[int]:
        gone = set(self.remove) | set(self.implant)
        return [i for i in range(self.size) if i not in gone]


@dataclass
class Plan:
    """What to do to each group. Serialises to JSON keyed by fully-qualified module names."""

    groups: dict[str, GroupPlan]
    implant_kind: str = "1x1"
    target: float = 0.0
    budget: str = "params"
    achieved: dict[str, float] = field(default_factory=dict)  # params/flops before, after, removed fractions
    criterion: str = ""
    seed: int = 0
    round_to: int = 1
    implant_rank: int = 0  # head dimension of implanted attention heads (haprune.hf); 0 for CNN plans
    version: int = PLAN_VERSION

    def counts(self) -> dict[str, int]:
        return {
            "removed": sum(len(g.remove) for g in self.groups.values()),
            "implanted": sum(len(g.implant) for g in self.groups.values()),
            "kept": sum(len(g.keep) for g in self.groups.values()),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = {k: {"size": g.size, "remove": g.remove, "implant": g.implant} for k, g in self.groups.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        groups = {k: GroupPlan(int(g["size"]), [int(i) for i in g["remove"]], [int(i) for i in g["implant"]])
                  for k, g in d["groups"].items()}
        rest = {k: v for k, v in d.items() if k != "groups"}
        return cls(groups=groups, **rest)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def identity(cls, structures: StructureSet) -> "Plan":
        """A plan that changes nothing."""
        return cls({g.name: GroupPlan(g.size) for g in structures})


# ---------------------------------------------------------------------------------------------------- costs

@dataclass
class _TensorCost:
    const: int  # product of the dimensions coupled to no group
    dims: list[tuple[int, int, int]]  # (group index, positions per channel, uncoupled positions) per coupled dim
    spatial: int  # output positions per sample (for FLOPs); 0 = no FLOPs
    implant: tuple[int, int, int] | None  # (out group index, kernel area k*k, in group index or -1) for k x k convs


class CostModel:
    """Exact parameter and FLOP counts of the model after any plan, from per-group channel counts.

    With ``latency`` (a :class:`haprune.latency.LatencyTable` measured on this model) it also predicts the
    forward time (:meth:`latency_ms`), which ``make_plan(..., budget="latency")`` plans against.
    """

    def __init__(self, model: nn.Module, structures: StructureSet, example_inputs: Any,
                 latency: "LatencyTable | None" = None):
        self.structures = structures
        gidx = {g.name: i for i, g in enumerate(structures)}
        spatial = _output_positions(model, example_inputs)
        coupled: dict[str, dict[int, tuple[int, int, int]]] = {}
        params = dict(model.named_parameters())
        for g in structures:
            for s in g.slices:
                param = params.get(s.tensor)
                if param is None:  # a buffer (BatchNorm statistics): no parameters to count
                    continue
                full = param.shape[s.dim]
                mult = s.multiplicity
                coupled.setdefault(s.tensor, {})[s.dim] = (gidx[g.name], mult, full - len(s.idxs))
        implant_out = {m: gidx[g.name] for g in structures for m in g.implantable}
        self.tensors: list[_TensorCost] = []
        for name, p in model.named_parameters():
            mod_name, _, leaf = name.rpartition(".")
            dims = coupled.get(name, {})
            const = math.prod(n for d, n in enumerate(p.shape) if d not in dims)
            module = model.get_submodule(mod_name) if mod_name else model
            is_mac = leaf == "weight" and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
            implant = None
            if is_mac and mod_name in implant_out and 0 in dims:
                k2 = p.shape[2] * p.shape[3]
                implant = (implant_out[mod_name], k2, dims[1][0] if 1 in dims else -1)
            self.tensors.append(_TensorCost(const, list(dims.values()), spatial.get(mod_name, 0) if is_mac else 0,
                                            implant))
        self.sizes = [g.size for g in structures]
        self.num_groups = len(self.sizes)
        self.latency_table = latency
        if latency is not None:
            self._init_latency(model, coupled, gidx, latency)

    def _init_latency(self, model: nn.Module, coupled: dict[str, dict[int, tuple[int, int, int]]],
                      gidx: dict[str, int], table: "LatencyTable") -> None:
        # per timed layer: how its (input, output) width follows the groups: (group, positions per channel,
        # uncoupled positions) or None (fixed), and the groups it depends on
        self._layer_dims: dict[str, tuple[Any, Any, int, int]] = {}
        self.group_layers: list[list[str]] = [[] for _ in self.sizes]
        modules = dict(model.named_modules())
        for name in table.layers:
            m = modules.get(name)
            if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                raise ValueError(f"the latency table times {name!r}, which is not a Conv/Linear layer of this model; "
                                 "measure the table on this model (haprune.latency.measure_latency_table)")
            full_in, full_out = channel_widths(m)
            lt = table.layers[name]
            if (lt.in_widths[-1], lt.out_widths[-1]) != (full_in, full_out):
                raise ValueError(f"the latency table times {name!r} at up to {lt.in_widths[-1]} -> "
                                 f"{lt.out_widths[-1]} channels, but this model's layer has {full_in} -> {full_out}: "
                                 "measure the table on this model (haprune.latency.measure_latency_table)")
            dims = coupled.get(f"{name}.weight", {})
            out_dim = dims.get(0)
            depthwise = isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            in_dim = out_dim if depthwise else dims.get(1)
            self._layer_dims[name] = (in_dim, out_dim, full_in, full_out)
            for d in {in_dim, out_dim} - {None}:
                if name not in self.group_layers[d[0]]:
                    self.group_layers[d[0]].append(name)

    def layer_widths(self, alive: list[int], names: list[str] | None = None) -> dict[str, tuple[int, int]]:
        """(input, output) width of the latency table's layers (or of ``names``) when group i keeps ``alive[i]``."""
        def width(dim, full):
            return full if dim is None else dim[2] + dim[1] * alive[dim[0]]
        dims = self._layer_dims
        return {n: (width(dims[n][0], dims[n][2]), width(dims[n][1], dims[n][3])) for n in (names or dims)}

    def latency_ms(self, alive: list[int]) -> float:
        """Predicted forward time (ms, the table's layers summed) when group i keeps ``alive[i]`` channels.

        Implanted channels count as kept: merged for deployment (``haprune.merge_implants``) they are full
        k x k rows."""
        if self.latency_table is None:
            raise ValueError("this CostModel has no latency table: pass latency=measure_latency_table(...)")
        return self.latency_table.total_ms(self.layer_widths(alive))

    def count(self, alive: list[int], implanted: list[int] | None = None, kind: str = "1x1") -> tuple[int, int]:
        """(params, flops) when group i keeps ``alive[i]`` channels, ``implanted[i]`` of them as implants."""
        implanted = implanted or [0] * self.num_groups
        params = flops = 0
        for t in self.tensors:
            n = t.const
            for gi, mult, extra in t.dims:
                n *= extra + mult * alive[gi]
            if t.implant is not None and implanted[t.implant[0]]:
                # an implanted output row of a k x k conv costs in (1x1) or in + k*k (separable) instead of in*k*k
                gi, k2, _ = t.implant
                m, row = implanted[gi], n // alive[gi]
                implant_row = row // k2 + (k2 if kind == "separable" else 0)
                n = (alive[gi] - m) * row + m * implant_row
            params += n
            flops += n * t.spatial
        return params, flops

    def dense(self) -> tuple[int, int]:
        return self.count(list(self.sizes))


def _output_positions(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Per Conv/Linear module: positions per sample its weight is applied at (H*W for convs, tokens for linears)."""
    out: dict[str, int] = {}

    def positions(name: str):
        def hook(mod, i, o) -> None:
            if isinstance(mod, nn.Linear):
                out[name] = int(o.numel() // o.shape[0] // o.shape[-1]) if o.dim() > 1 else 1
            else:  # a transposed conv's MACs scale with its *input* positions
                out[name] = int((i[0] if mod.transposed else o).shape[2:].numel())
        return hook

    forward_with_hooks(model, example_inputs, {m: positions(n) for n, m in model.named_modules()
                                               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))})
    return out


# ---------------------------------------------------------------------------------------------------- solver

def _round_removals(removed: list[int], ranked: list[int], size: int, cap: int, multiple: int) -> list[int]:
    """Adjust one group's removals so its remaining width is a multiple of ``multiple`` (or the full width).

    Rounds the remaining width to the nearest allowed value (never removing more than ``cap``); extra removals
    take the group's next least important channels, restored ones are its most important removed ones.
    """
    if not removed:
        return removed
    alive = size - len(removed)
    options = [w for w in range(multiple, size + 1, multiple) if size - w <= cap] + [size]
    width = min(options, key=lambda w: (abs(w - alive), -w))
    n = size - width
    return ranked[:n]


def make_plan(
    structures: StructureSet,
    scores: torch.Tensor,
    cost: CostModel,
    target: float,
    *,
    budget: Literal["params", "flops", "latency"] = "params",
    max_layer_ratio: float = 0.9,
    min_channels: int = 1,
    implant_ratio: float = 0.0,
    implant_kind: str = "1x1",
    criterion: str = "",
    seed: int = 0,
    tolerance: float = 0.01,
    round_to: int = 1,
) -> Plan:
    """Remove the least important structures until ``target`` of the params (or FLOPs) is gone.

    Args:
        scores: flat per-structure importance (higher = keep), in ``structures`` order.
        target: fraction in [0, 1) of parameters (``budget="params"``) or FLOPs removed, including implants; with
            ``budget="latency"``, of the forward time that ``cost``'s latency table predicts. A latency plan removes,
            group by group in steps of ``round_to`` channels, the channels with the smallest summed score per
            millisecond saved (a greedy knapsack; a score order alone would spend accuracy on layers whose time
            does not fall), and takes no implants (merged for deployment they cost what kept channels cost).
        max_layer_ratio: at most this fraction of any group's channels is removed (enforced, not a hint).
        min_channels: every group keeps at least this many channels (kept + implanted).
        implant_ratio: implant this many structures per removed one (e.g. 0.1), the next most important ones
            above the removal threshold among groups that can take an implant.
        tolerance: the achieved fraction must be within this of the target, else :class:`BudgetError`.
        round_to: every group's remaining width (kept + implanted) is a multiple of this, or the full width
            (many kernels run faster on round widths); removals per group are rounded to the nearest such width
            using the group's own ranking, then the global search meets the budget as usual.
    Ties are broken by group order then channel index, so a plan is deterministic for given scores.
    """
    if not 0.0 <= target < 1.0 or math.isnan(target):
        raise ValueError(f"target must be a fraction in [0, 1), e.g. 0.5 for half the {budget}; got {target}")
    if not 0.0 <= max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in [0, 1], got {max_layer_ratio}")
    if budget not in ("params", "flops", "latency"):
        raise ValueError(f"budget must be 'params', 'flops' or 'latency', got {budget!r}")
    if budget == "latency" and cost.latency_table is None:
        raise ValueError("budget='latency' needs a CostModel with a latency table: "
                         "CostModel(model, structures, x, latency=haprune.latency.measure_latency_table(...))")
    if budget == "latency" and implant_ratio > 0:
        raise ValueError("budget='latency' plans no implants (merged for deployment an implanted channel costs what "
                         "a kept one costs); use implant_ratio=0, or a params/flops budget for implants")
    if implant_kind not in IMPLANT_KINDS:
        raise ValueError(f"implant_kind must be one of {IMPLANT_KINDS}, got {implant_kind!r}")
    if implant_ratio < 0:
        raise ValueError(f"implant_ratio must be >= 0, got {implant_ratio}")
    scores = scores.double().cpu()
    if scores.shape != (structures.num_structures,):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({structures.num_structures},)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; the sensitivity pass failed (check the calibration data)")

    names = structures.names
    gof = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(structures)])
    cof = torch.cat([torch.arange(g.size) for g in structures])
    order = sorted(range(structures.num_structures), key=lambda j: (float(scores[j]), int(gof[j]), int(cof[j])))
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    caps = [min(int(math.floor(max_layer_ratio * g.size + 1e-9)), g.size - min_channels) for g in structures]
    # each group's channels from least to most important, for rounding widths within a group
    ranked_in_group: list[list[int]] = [[] for _ in structures]
    scores_in_group: list[list[float]] = [[] for _ in structures]  # the same order's scores
    for j in order:
        ranked_in_group[int(gof[j])].append(int(cof[j]))
        scores_in_group[int(gof[j])].append(float(scores[j]))
    implantable = [bool(g.implantable) for g in structures]
    if budget == "latency":
        removed = _latency_removals(scores_in_group, ranked_in_group, caps, cost, target, tolerance, round_to)
        return _finish_plan(structures, cost, removed, [[] for _ in names], implant_kind, target, budget, criterion,
                            seed, round_to)
    which = 0 if budget == "params" else 1
    dense = cost.dense()[which]

    def decide(n_remove: int, skip: frozenset[int] = frozenset(), n_impl: int | None = None):
        removed: list[list[int]] = [[] for _ in names]
        rest, last = [], -1
        count = 0
        for j in order:
            gi = int(gof[j])
            if count < n_remove and j not in skip and len(removed[gi]) < caps[gi]:
                removed[gi].append(int(cof[j]))
                count += 1
                last = j
            else:
                rest.append(j)
        if round_to > 1:
            removed = [_round_removals(r, ranked_in_group[gi], structures.groups[gi].size, caps[gi], round_to)
                       for gi, r in enumerate(removed)]
            gone = {(gi, c) for gi, r in enumerate(removed) for c in r}
            rest = [j for j in order if (int(gof[j]), int(cof[j])) not in gone]
            count = sum(len(r) for r in removed)
        n_impl = int(round(implant_ratio * count)) if n_impl is None else n_impl
        implanted: list[list[int]] = [[] for _ in names]
        for j in rest:
            if n_impl <= 0:
                break
            gi = int(gof[j])
            if implantable[gi]:
                implanted[gi].append(int(cof[j]))
                n_impl -= 1
        alive = [g.size - len(r) for g, r in zip(structures, removed)]
        frac = 1.0 - cost.count(alive, [len(i) for i in implanted], implant_kind)[which] / dense
        return removed, implanted, last, frac

    def smallest_reaching(skip: frozenset[int]) -> int:
        lo, hi = 0, structures.num_structures
        while lo < hi:  # smallest number of removals that reaches the target
            mid = (lo + hi) // 2
            if decide(mid, skip)[3] >= target:
                hi = mid
            else:
                lo = mid + 1
        return lo

    most = decide(structures.num_structures)[3]
    if most < target - tolerance:
        raise BudgetError(
            f"cannot remove {target:.1%} of {budget}: at most {most:.1%} is removable with "
            f"max_layer_ratio={max_layer_ratio} and min_channels={min_channels}; raise max_layer_ratio, "
            "lower the target, or ignore fewer layers")
    skip: frozenset[int] = frozenset()
    best = None
    for _ in range(200):
        candidate = decide(smallest_reaching(skip), skip)
        if best is None or abs(candidate[3] - target) < abs(best[3] - target):
            best = candidate
        if target - tolerance <= candidate[3] <= target + tolerance or candidate[2] < 0:
            break
        # the last structure overshoots the budget: keep it and take the next ones in rank order instead
        skip = skip | {candidate[2]}
    if not target - tolerance <= best[3] <= target + tolerance and implant_ratio > 0:
        # an implant of a large structure can jump past the budget: try fewer implants near the boundary
        n0 = sum(len(r) for r in best[0])
        for n in range(max(0, n0 - 3), n0 + 4):
            for k in range(int(round(implant_ratio * n)), -1, -1):
                candidate = decide(n, skip, k)
                if abs(candidate[3] - target) < abs(best[3] - target):
                    best = candidate
    removed, implanted, _, frac = best
    if abs(frac - target) > tolerance and target > 0:
        raise _coarse(frac, target, budget, tolerance, round_to)
    return _finish_plan(structures, cost, removed, implanted, implant_kind, target, budget, criterion, seed, round_to)


def _coarse(frac: float, target: float, budget: str, tolerance: float, round_to: int) -> BudgetError:
    return BudgetError(f"the plan removes {frac:.2%} of {budget}, not within {tolerance:.0%} of {target:.0%}; "
                       "the structures are too coarse for this target"
                       + (f" with round_to={round_to}; use a smaller round_to" if round_to > 1 else "")
                       + " (or pass a larger tolerance)")


def _finish_plan(structures: StructureSet, cost: CostModel, removed: list[list[int]], implanted: list[list[int]],
                 implant_kind: str, target: float, budget: str, criterion: str, seed: int, round_to: int) -> Plan:
    alive = [g.size - len(r) for g, r in zip(structures, removed)]
    p_after, f_after = cost.count(alive, [len(i) for i in implanted], implant_kind)
    p0, f0 = cost.dense()
    achieved = {"params_before": p0, "params_after": p_after, "params_removed": 1 - p_after / p0,
                "flops_before": f0, "flops_after": f_after, "flops_removed": 1 - f_after / max(f0, 1)}
    if cost.latency_table is not None:
        l0, l1 = cost.latency_ms(list(cost.sizes)), cost.latency_ms(alive)
        achieved.update(latency_before_ms=l0, latency_after_ms=l1, latency_removed=1 - l1 / l0)
    return Plan(
        groups={n: GroupPlan(g.size, sorted(r), sorted(i))
                for n, g, r, i in zip(structures.names, structures, removed, implanted)},
        implant_kind=implant_kind, target=target, budget=budget, criterion=criterion, seed=seed,
        round_to=round_to, achieved=achieved,
    )


def _latency_removals(scores_in_group: list[list[float]], ranked_in_group: list[list[int]], caps: list[int],
                      cost: CostModel, target: float, tolerance: float, round_to: int) -> list[list[int]]:
    """Greedy knapsack on predicted latency: per step, the move (one group to a smaller allowed width, its least
    important channels first) with the least summed score per millisecond saved; moves that would overshoot
    the target by more than ``tolerance`` are passed over while others remain."""
    sizes = list(cost.sizes)
    prefix = [[0.0] for _ in sizes]  # prefix[g][r]: summed score of the group's r least important channels
    for gi, sc in enumerate(scores_in_group):
        for v in sc:
            prefix[gi].append(prefix[gi][-1] + v)
    options = [[r for r in range(1, cap + 1) if (size - r) % round_to == 0] for size, cap in zip(sizes, caps)]
    table = cost.latency_table
    share: list[set[int]] = [set() for _ in sizes]  # groups whose layers overlap each group's
    layer_groups: dict[str, set[int]] = {}
    for gi, layers in enumerate(cost.group_layers):
        for n in layers:
            layer_groups.setdefault(n, set()).add(gi)
    for gs in layer_groups.values():
        for gi in gs:
            share[gi] |= gs
    alive = list(sizes)
    removed_n = [0] * len(sizes)
    dense_ms = cost.latency_ms(alive)
    goal = (1.0 - target) * dense_ms
    low = goal - tolerance * dense_ms  # below this the target is overshot

    def group_ms(gi: int) -> float:
        """Time of the layers whose widths follow group gi, at the current widths."""
        return sum(table.layers[n](*w) for n, w in cost.layer_widths(alive, cost.group_layers[gi]).items())

    def moves(gi: int) -> list[tuple[float, int, float]]:
        """(score per ms saved, removals, ms saved) of every move of group gi that saves time."""
        if not cost.group_layers[gi]:
            return []
        now, keep, out = group_ms(gi), alive[gi], []
        for r in options[gi]:
            if r <= removed_n[gi]:
                continue
            alive[gi] = sizes[gi] - r
            saved = now - group_ms(gi)
            alive[gi] = keep
            if saved > 1e-12:
                out.append(((prefix[gi][r] - prefix[gi][removed_n[gi]]) / saved, r, saved))
        return out

    cur = dense_ms
    open_moves = {gi: moves(gi) for gi in range(len(sizes))}  # kept up to date for the groups a move touches
    while cur > goal + 1e-12:
        candidates = [(ratio, gi, r, saved) for gi, ms in open_moves.items() for ratio, r, saved in ms]
        if not candidates:
            raise BudgetError(
                f"cannot remove {target:.1%} of the predicted latency: at most {1 - cur / dense_ms:.1%} is removable "
                f"with these caps (max_layer_ratio, min_channels) and round_to={round_to}; lower the target")
        fitting = [c for c in candidates if cur - c[3] >= low]
        ratio, gi, r, saved = min(fitting or candidates, key=lambda c: (c[0], c[1], c[2]))
        removed_n[gi] = r
        alive[gi] = sizes[gi] - r
        cur = cost.latency_ms(alive)
        for gj in share[gi] | {gi}:
            open_moves[gj] = moves(gj)
    frac = 1.0 - cur / dense_ms
    if abs(frac - target) > tolerance and target > 0:
        raise _coarse(frac, target, "latency", tolerance, round_to)
    return [ranked_in_group[gi][:removed_n[gi]] for gi in range(len(sizes))]

