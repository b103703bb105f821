"""Plan: which structures to keep, implant or remove, as a plain JSON-serialisable object.

:func:`make_plan` removes structures until the target fraction of parameters, FLOPs or predicted latency is
removed, within one percentage point, while honouring a hard per-group maximum removal ratio and a minimum number
of channels. Two allocations choose what goes (``allocation=``):

* ``"global"``: rank every structure by score, remove the least important first (the raw global ranking);
* ``"cost-aware"``: a greedy knapsack: per step, the move (one group to its next smaller allowed width, its least
  important channels first) with the smallest summed score per unit of budget saved (parameters, FLOPs or
  predicted milliseconds), so accuracy is spent where the budget falls most.

The next band of structures above the removal threshold (``implant_ratio`` times the number removed, among
structures that can take one) gets a Neural Implant instead: its k x k convolution rows become a cheaper 1 x 1 (or
separable) convolution. Unlike the official code, the budget counts the implants' own cost, so the plan's size is
the pruned model's size. Implants never replace a group's last real channels: every group keeps at least
``max(min_channels, size - floor(max_layer_ratio * size))`` of its channels as they are (a group fully replaced
by zero-initialised implants would no longer carry its input's signal).

The cost model (:class:`CostModel`) is exact on every graph :func:`haprune.graph.build_structures` accepts: every
tensor's size is the product of its dimensions, each coupled dimension the positions owned by no group plus the
kept positions of every group that slices it (a concatenation's consumer is sliced by several groups, each owning
its own indices; a split gives a group only some of a tensor's positions). FLOPs are multiply-accumulates of Conv
and Linear layers (the convention of the pruning literature) counted per module call by :func:`module_macs`, the
same counter :func:`haprune.report.count_flops` uses, so windows folded into the batch dimension (Swin) and layers
called twice are counted as they run.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .graph import StructureSet, channel_widths, forward_with_hooks

if TYPE_CHECKING:
    from .latency import LatencyTable

IMPLANT_KINDS = ("1x1", "separable")  # CNN implants; haprune.hf plans use "lowrank" (attention heads)
ALLOCATIONS = ("global", "cost-aware")
# The allocation make_plan uses per budget when none is given. Params and FLOPs: chosen one-shot on the default
# (compensated) pipeline by benchmarks/allocation.py, see docs/results/allocation.md. Latency: the knapsack, since a
# score order alone spends accuracy on layers whose time hardly falls.
DEFAULT_ALLOCATION: Mapping[str, str] = {"params": "global", "flops": "cost-aware", "latency": "cost-aware"}
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
    """What to do to each group. Serialises to JSON keyed by fully-qualified module names.

    ``notes``: what the planner could not do as asked and why (e.g. implants asked for on a model with no k x k
    convolution to implant into), for the user to read; ``allocation``: ``"global"`` or ``"cost-aware"`` (empty in
    plans written before it was recorded). Plans saved without these fields still load.
    """

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
    allocation: str = ""
    notes: list[str] = field(default_factory=list)

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
        if "notes" in rest:
            rest["notes"] = [str(n) for n in rest["notes"]]
        return cls(groups=groups, **rest)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    @classmethod
    def identity(cls, structures: StructureSet) -> "Plan":
        """A plan that changes nothing."""
        return cls({g.name: GroupPlan(g.size) for g in structures})


# ---------------------------------------------------------------------------------------------------- MACs

_MAC_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def layer_macs(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a Conv or Linear layer on input ``x`` giving ``y``, for the whole batch.

    Linear: output elements x in_features; conv: output elements x in_channels / groups x kernel area; transposed
    conv: input elements x out_channels / groups x kernel area. Equivalently: the weight's size times the positions
    it is applied at, whatever the leading dimensions hold (batch, windows, tokens).
    """
    if isinstance(module, nn.Linear):
        return y.numel() * module.in_features
    kernel = math.prod(module.kernel_size)
    if module.transposed:  # every input element meets out_channels / groups x kernel weights
        return x.numel() * (module.out_channels // module.groups) * kernel
    return y.numel() * (module.in_channels // module.groups) * kernel


def batch_size(example_inputs: Any) -> int:
    """The leading dimension of the first tensor in ``example_inputs`` (a tensor, or a tuple / dict of them)."""
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    first = values if isinstance(values, torch.Tensor) else next(
        (t for t in values if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise ValueError("example_inputs must hold a batched tensor (batch first) to count FLOPs per sample")
    return int(first.shape[0])


def module_macs(model: nn.Module, example_inputs: Any) -> dict[nn.Module, int]:
    """Multiply-accumulates of every Conv / Linear module of ``model``, summed over its calls in one forward pass
    on ``example_inputs`` (the whole batch; divide by :func:`batch_size` for per sample). Modules that did not run
    are absent. The model runs once in eval mode without gradients; its mode is restored."""
    out: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        out[module] = out.get(module, 0) + layer_macs(module, inputs[0], output)

    forward_with_hooks(model, example_inputs, {m: hook for m in model.modules() if isinstance(m, _MAC_LAYERS)})
    return out


# ---------------------------------------------------------------------------------------------------- costs

@dataclass
class _Slice:
    """The positions of one tensor dimension that one group owns."""

    group: int
    per_channel: np.ndarray  # int64 (group size,): positions owned by each channel of the group
    total: int  # positions owned by the group
    mult: int | None  # positions per channel when every channel owns the same number (the usual case), else None


@dataclass
class _TensorCost:
    name: str
    const: int  # product of the dimensions coupled to no group
    dims: list[tuple[int, tuple[int, ...]]]  # per coupled dim: (positions owned by no group, slice ids)
    spatial: int | float  # multiply-accumulates per weight element per sample (0: not a Conv/Linear weight)
    implant: tuple[int, int] | None  # (out group index, kernel area k*k) for the weight of an implantable conv


class CostModel:
    """Exact parameter and FLOP counts of the model after any plan, from per-group channel choices.

    :meth:`count` takes per-group kept counts (``alive``) or, exact on every graph, the removed channels themselves
    (``removed``: on a split, which channels go decides which positions go); :meth:`count_plan` counts a
    :class:`Plan`. With ``latency`` (a :class:`haprune.latency.LatencyTable` measured on this model) it also
    predicts the forward time (:meth:`latency_ms`), which ``make_plan(..., budget="latency")`` plans against.
    """

    def __init__(self, model: nn.Module, structures: StructureSet, example_inputs: Any,
                 latency: "LatencyTable | None" = None):
        self.structures = structures
        self.sizes = [g.size for g in structures]
        self.num_groups = len(self.sizes)
        params = dict(model.named_parameters())
        # (tensor name, dim) -> slice ids; positions owned by some group per (tensor, dim)
        self.slices: list[_Slice] = []
        coupled: dict[str, dict[int, list[int]]] = {}
        owned: dict[tuple[str, int], int] = {}
        for gi, g in enumerate(structures):
            for s in g.slices:
                if s.tensor not in params:  # a buffer (BatchNorm statistics): no parameters to count
                    continue
                per_channel = np.bincount(s.root_idxs.cpu().numpy(), minlength=g.size).astype(np.int64)
                counts = set(per_channel.tolist())
                mult = counts.pop() if len(counts) == 1 else None
                coupled.setdefault(s.tensor, {}).setdefault(s.dim, []).append(len(self.slices))
                self.slices.append(_Slice(gi, per_channel, int(per_channel.sum()), mult))
                owned[(s.tensor, s.dim)] = owned.get((s.tensor, s.dim), 0) + int(len(s.idxs))
        spatial = self._spatial(model, example_inputs)
        implant_out = {m: gi for gi, g in enumerate(structures) for m in g.implantable}
        self.tensors: list[_TensorCost] = []
        for name, p in model.named_parameters():
            mod_name, _, leaf = name.rpartition(".")
            dims = coupled.get(name, {})
            const = math.prod(n for d, n in enumerate(p.shape) if d not in dims)
            for d in dims:
                if owned[(name, d)] > p.shape[d]:
                    raise ValueError(f"groups overlap on dimension {d} of {name!r} ({owned[(name, d)]} positions "
                                     f"claimed of {p.shape[d]}): the structures are inconsistent; please report this")
            implant = None
            if leaf == "weight" and mod_name in implant_out and 0 in dims:
                implant = (implant_out[mod_name], int(p.shape[2] * p.shape[3]))
            self.tensors.append(_TensorCost(
                name, const, [(p.shape[d] - owned[(name, d)], tuple(ids)) for d, ids in sorted(dims.items())],
                spatial.get(name, 0), implant))
        # tensors whose size follows each group
        self.group_tensors: list[list[int]] = [[] for _ in self.sizes]
        for ti, t in enumerate(self.tensors):
            for gi in sorted({self.slices[s].group for _, ids in t.dims for s in ids}):
                self.group_tensors[gi].append(ti)
        self._coupled = coupled
        self.latency_table = latency
        if latency is not None:
            self._init_latency(model, latency)

    @staticmethod
    def _spatial(model: nn.Module, example_inputs: Any) -> dict[str, int | float]:
        """Per Conv/Linear weight: multiply-accumulates per weight element per sample, summed over the module's calls
        (the positions it is applied at: H*W for a conv, tokens x windows for a Linear on windows)."""
        batch = batch_size(example_inputs)
        names = {id(p): n for n, p in model.named_parameters()}
        out: dict[str, int | float] = {}
        for module, macs in module_macs(model, example_inputs).items():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or id(w) not in names or w.numel() == 0:
                continue
            per = macs / (batch * w.numel())
            name = names[id(w)]
            out[name] = out.get(name, 0) + (int(per) if float(per).is_integer() else per)
        return out

    def _init_latency(self, model: nn.Module, table: "LatencyTable") -> None:
        # per timed layer: for its (input, output) width, the positions owned by no group and the slices of its
        # weight's dimension, and the groups it depends on
        self._layer_dims: dict[str, tuple[tuple[int, tuple[int, ...], int], tuple[int, tuple[int, ...], int]]] = {}
        self.group_layers: list[list[str]] = [[] for _ in self.sizes]
        modules = dict(model.named_modules())
        for name in table.layers:
            m = modules.get(name)
            if not isinstance(m, _MAC_LAYERS):
                raise ValueError(f"the latency table times {name!r}, which is not a Conv/Linear layer of this model; "
                                 "measure the table on this model (haprune.latency.measure_latency_table)")
            full_in, full_out = channel_widths(m)
            lt = table.layers[name]
            if (lt.in_widths[-1], lt.out_widths[-1]) != (full_in, full_out):
                raise ValueError(f"the latency table times {name!r} at up to {lt.in_widths[-1]} -> "
                                 f"{lt.out_widths[-1]} channels, but this model's layer has {full_in} -> {full_out}: "
                                 "measure the table on this model (haprune.latency.measure_latency_table)")
            dims = self._coupled.get(f"{name}.weight", {})
            transposed = isinstance(m, nn.modules.conv._ConvNd) and m.transposed
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            out_ids = tuple(dims.get(out_dim, ()))
            groups = m.groups if isinstance(m, nn.modules.conv._ConvNd) else 1
            depthwise = groups > 1 and groups == full_in == full_out
            in_ids = out_ids if depthwise else tuple(dims.get(in_dim, ()))
            # a grouped conv's weight holds in_channels / groups input positions: the width is groups times that
            in_scale = 1 if depthwise or groups == 1 or not in_ids else groups

            def free(full: int, ids: tuple[int, ...], scale: int = 1) -> int:
                return full // scale - sum(self.slices[s].total for s in ids)

            self._layer_dims[name] = ((free(full_in, in_ids, in_scale), in_ids, in_scale),
                                      (free(full_out, out_ids), out_ids, 1))
            for gi in sorted({self.slices[s].group for s in in_ids + out_ids}):
                self.group_layers[gi].append(name)
            if self._widths([sl.total for sl in self.slices], [name])[name] != (full_in, full_out):
                raise ValueError(f"cannot follow the widths of {name!r} through the groups (a layer type the latency "
                                 "model does not know); plan with budget='params' or 'flops'")

    # -- kept positions

    def _kept(self, alive: Sequence[int] | None, removed: Sequence[Sequence[int]] | None) -> list[int]:
        """Kept positions of every slice, from the removed channels (exact) or from kept counts."""
        out = []
        for s in self.slices:
            size = self.sizes[s.group]
            if removed is not None:
                r = removed[s.group]
                if s.mult is not None:
                    out.append(s.mult * (size - len(r)))
                else:
                    out.append(s.total - (int(s.per_channel[list(r)].sum()) if len(r) else 0))
            elif s.mult is not None:
                out.append(s.mult * alive[s.group])
            else:  # which channels go is unknown: their share of the positions
                out.append(int(round(s.total * alive[s.group] / size)))
        return out

    def _alive(self, alive: Sequence[int] | None, removed: Sequence[Sequence[int]] | None) -> list[int]:
        if removed is not None:
            if len(removed) != self.num_groups:
                raise ValueError(f"removed has {len(removed)} entries, expected one per group ({self.num_groups})")
            return [size - len(r) for size, r in zip(self.sizes, removed)]
        if alive is None:
            return list(self.sizes)
        if len(alive) != self.num_groups:
            raise ValueError(f"alive has {len(alive)} entries, expected one per group ({self.num_groups})")
        return list(alive)

    def _tensor_sizes(self, kept: Sequence[int], alive: Sequence[int], implanted: Sequence[int],
                      kind: str) -> list[int]:
        sizes = []
        for t in self.tensors:
            n = t.const
            for extra, ids in t.dims:
                n *= extra + sum(kept[s] for s in ids)
            if t.implant is not None and implanted[t.implant[0]]:
                # an implanted output row of a k x k conv costs in (1x1) or in + k*k (separable) instead of in*k*k
                gi, k2 = t.implant
                m, row = implanted[gi], n // alive[gi]
                implant_row = row // k2 + (k2 if kind == "separable" else 0)
                n = (alive[gi] - m) * row + m * implant_row
            sizes.append(n)
        return sizes

    # -- public counts

    def count(self, alive: Sequence[int] | None = None, implanted: Sequence[int] | None = None, kind: str = "1x1",
              *, removed: Sequence[Sequence[int]] | None = None) -> tuple[int, int]:
        """(params, flops) when group i keeps ``alive[i]`` channels, ``implanted[i]`` of them as implants.

        Pass ``removed`` (the removed channel indices per group) instead of ``alive`` for the exact count on every
        graph: where a group owns only some positions of a tensor (a split), which channels go decides the size."""
        alive = self._alive(alive, removed)
        implanted = list(implanted) if implanted is not None else [0] * self.num_groups
        sizes = self._tensor_sizes(self._kept(alive, removed), alive, implanted, kind)
        flops = sum(n * t.spatial for n, t in zip(sizes, self.tensors))
        return int(sum(sizes)), int(round(flops))

    def count_plan(self, plan: Plan) -> tuple[int, int]:
        """(params, flops) of the model after ``plan`` (exact)."""
        names = self.structures.names
        missing = [n for n in names if n not in plan.groups]
        if missing:
            raise ValueError(f"the plan has no entry for group(s) {missing[:3]}: was it made for another model?")
        removed = [plan.groups[n].remove for n in names]
        return self.count(implanted=[len(plan.groups[n].implant) for n in names], kind=plan.implant_kind,
                          removed=removed)

    def dense(self) -> tuple[int, int]:
        return self.count(list(self.sizes))

    def layer_widths(self, alive: Sequence[int] | None = None, names: Sequence[str] | None = None, *,
                     removed: Sequence[Sequence[int]] | None = None) -> dict[str, tuple[int, int]]:
        """(input, output) width of the latency table's layers (or of ``names``) when group i keeps ``alive[i]``
        (or loses the channels ``removed[i]``)."""
        kept = self._kept(self._alive(alive, removed), removed)
        return self._widths(kept, names)

    def _widths(self, kept: Sequence[int], names: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
        dims = self._layer_dims
        return {n: tuple(scale * (extra + sum(kept[s] for s in ids)) for extra, ids, scale in dims[n])  # type: ignore[misc]
                for n in (names or dims)}

    def latency_ms(self, alive: Sequence[int] | None = None, *,
                   removed: Sequence[Sequence[int]] | None = None) -> float:
        """Predicted forward time (ms, the table's layers summed) when group i keeps ``alive[i]`` channels (or loses
        ``removed[i]``).

        Implanted channels count as kept: merged for deployment (``haprune.merge_implants``) they are full
        k x k rows."""
        if self.latency_table is None:
            raise ValueError("this CostModel has no latency table: pass latency=measure_latency_table(...)")
        return self.latency_table.total_ms(self.layer_widths(alive, removed=removed))


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
    allocation: Literal["global", "cost-aware"] | None = None,
) -> Plan:
    """Remove structures until ``target`` of the params (or FLOPs, or predicted latency) is gone.

    Args:
        scores: flat per-structure importance (higher = keep), in ``structures`` order.
        target: fraction in [0, 1) of parameters (``budget="params"``) or FLOPs removed, including implants; with
            ``budget="latency"``, of the forward time that ``cost``'s latency table predicts (no implants there:
            merged for deployment they cost what kept channels cost).
        allocation: ``"global"`` removes structures in score order (the raw global ranking); ``"cost-aware"``
            removes, group by group in steps of ``round_to`` channels, the channels with the smallest summed score
            per unit of budget saved (a greedy knapsack: a score order alone spends accuracy on layers whose cost
            hardly falls). Default: :data:`DEFAULT_ALLOCATION` for the budget (``"global"`` for params,
            ``"cost-aware"`` for FLOPs and latency).
        max_layer_ratio: at most this fraction of any group's channels is removed (enforced, not a hint); removed
            and implanted channels together also stay within it.
        min_channels: every group keeps at least this many channels as they are (not implanted).
        implant_ratio: implant this many structures per removed one (e.g. 0.1), the next most important ones
            above the removal threshold among groups that can take an implant. When fewer can be placed (no k x k
            conv in any prunable group, or every such group at its limit), ``plan.notes`` says so.
        tolerance: the achieved fraction must be within this of the target, else :class:`BudgetError`.
        round_to: every group's remaining width (kept + implanted) is a multiple of this, or the full width
            (many kernels run faster on round widths).
    Ties are broken by group order then channel index, so a plan is deterministic for given scores.
    """
    if not 0.0 <= target < 1.0 or math.isnan(target):
        raise ValueError(f"target must be a fraction in [0, 1), e.g. 0.5 for half the {budget}; got {target}")
    if not 0.0 <= max_layer_ratio <= 1.0:
        raise ValueError(f"max_layer_ratio must be in [0, 1], got {max_layer_ratio}")
    if budget not in ("params", "flops", "latency"):
        raise ValueError(f"budget must be 'params', 'flops' or 'latency', got {budget!r}")
    if allocation is None:
        allocation = DEFAULT_ALLOCATION[budget]
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if budget == "latency" and cost.latency_table is None:
        raise ValueError("budget='latency' needs a CostModel with a latency table: "
                         "CostModel(model, structures, x, latency=haprune.latency.measure_latency_table(...))")
    if budget == "latency" and implant_ratio > 0:
        raise ValueError("budget='latency' plans no implants (merged for deployment an implanted channel costs what "
                         "a kept one costs); use implant_ratio=0, or a params/flops budget for implants")
    if implant_kind not in IMPLANT_KINDS:
        raise ValueError(f"implant_kind must be one of {IMPLANT_KINDS}, got {implant_kind!r}")
    if implant_ratio < 0 or math.isnan(implant_ratio):
        raise ValueError(f"implant_ratio must be >= 0, got {implant_ratio}")
    if min_channels < 1:
        raise ValueError(f"min_channels must be at least 1 (a group with no channel left cuts the network), "
                         f"got {min_channels}")
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    if cost.structures is not structures and cost.sizes != [g.size for g in structures]:
        raise ValueError("the CostModel was built for other structures: build it from the same StructureSet")
    scores = scores.double().cpu()
    if scores.shape != (structures.num_structures,):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({structures.num_structures},)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; the sensitivity pass failed (check the calibration data)")

    solver = _Solver(structures, scores, cost, target, budget, max_layer_ratio, min_channels, implant_ratio,
                     implant_kind, tolerance, round_to)
    if allocation == "global":
        removed, implanted = solver.global_ranking()
    else:
        removed, implanted = solver.cost_aware()
    return _finish_plan(structures, cost, removed, implanted, implant_kind, target, budget, criterion, seed,
                        round_to, allocation, solver.notes(implanted))


class _Solver:
    """State shared by the two allocations: rankings, caps, the budget's measure, implant placement."""

    def __init__(self, structures: StructureSet, scores: torch.Tensor, cost: CostModel, target: float, budget: str,
                 max_layer_ratio: float, min_channels: int, implant_ratio: float, implant_kind: str,
                 tolerance: float, round_to: int):
        self.structures, self.cost, self.target, self.budget = structures, cost, target, budget
        self.implant_ratio, self.implant_kind = implant_ratio, implant_kind
        self.tolerance, self.round_to = tolerance, round_to
        self.max_layer_ratio, self.min_channels = max_layer_ratio, min_channels
        self.sizes = [g.size for g in structures]
        gof = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(structures)]).tolist()
        cof = torch.cat([torch.arange(g.size) for g in structures]).tolist()
        flat = scores.tolist()
        self.order = sorted(range(structures.num_structures), key=lambda j: (flat[j], gof[j], cof[j]))
        self.gof, self.cof, self.flat = gof, cof, flat
        limit = [int(math.floor(max_layer_ratio * s + 1e-9)) for s in self.sizes]
        self.caps = [min(lim, s - min_channels) for lim, s in zip(limit, self.sizes)]
        # real (not implanted) channels every group keeps: implants never replace a group's last real channels
        self.min_keep = [max(min_channels, s - lim, 1) for lim, s in zip(limit, self.sizes)]
        self.ranked: list[list[int]] = [[] for _ in self.sizes]  # each group's channels, least important first
        self.ranked_scores: list[list[float]] = [[] for _ in self.sizes]
        for j in self.order:
            self.ranked[gof[j]].append(cof[j])
            self.ranked_scores[gof[j]].append(flat[j])
        self.implantable = [bool(g.implantable) for g in structures]
        self.asked_implants = 0  # implants the ratio asked for in the chosen plan, for the notes
        which = {"params": 0, "flops": 1}.get(budget)
        self.which = which
        self.dense = self.measure([[] for _ in self.sizes], [0] * len(self.sizes))

    # -- the budget's measure

    def measure(self, removed: list[list[int]], implanted: list[int]) -> float:
        if self.which is None:
            return self.cost.latency_ms(removed=removed)
        return float(self.cost.count(implanted=implanted, kind=self.implant_kind, removed=removed)[self.which])

    def fraction(self, removed: list[list[int]], implanted: list[list[int]]) -> float:
        return 1.0 - self.measure(removed, [len(i) for i in implanted]) / self.dense

    # -- implants

    def place_implants(self, removed: list[list[int]], n_impl: int) -> list[list[int]]:
        """The next ``n_impl`` structures above the removal threshold (score order) among groups that can take an
        implant, each group keeping at least ``min_keep`` real channels."""
        implanted: list[list[int]] = [[] for _ in self.sizes]
        if n_impl <= 0 or not any(self.implantable):
            return implanted
        gone = [set(r) for r in removed]
        room = [s - len(r) - k if imp else 0 for s, r, k, imp in zip(self.sizes, removed, self.min_keep,
                                                                       self.implantable)]
        for j in self.order:
            if n_impl <= 0:
                break
            gi, c = self.gof[j], self.cof[j]
            if room[gi] > 0 and c not in gone[gi]:
                implanted[gi].append(c)
                room[gi] -= 1
                n_impl -= 1
        return implanted

    def wanted_implants(self, removed: list[list[int]]) -> int:
        return int(round(self.implant_ratio * sum(len(r) for r in removed)))

    def notes(self, implanted: list[list[int]]) -> list[str]:
        out = []
        if self.implant_ratio > 0 and not any(self.implantable):
            out.append(f"implant_ratio={self.implant_ratio:g} gave no implants: no prunable group of this model has "
                       "a plain k x k Conv2d (k > 1, no groups or dilation) whose output rows an implant can replace "
                       "(1 x 1, depthwise, grouped and Linear layers take none); the plan only removes structures")
        elif self.implant_ratio > 0:
            placed = sum(len(i) for i in implanted)
            if placed < self.asked_implants:
                out.append(f"{placed} implants placed where implant_ratio={self.implant_ratio:g} asked for "
                           f"{self.asked_implants}: the groups that can take one are at their limit (each keeps at "
                           f"least max(min_channels, size - floor(max_layer_ratio * size)) real channels), or fewer "
                           "implants were needed to stay within the tolerance of the target")
        return out

    def error_unreachable(self, most: float) -> BudgetError:
        return BudgetError(
            f"cannot remove {self.target:.1%} of {self.budget}: at most {most:.1%} is removable with "
            f"max_layer_ratio={self.max_layer_ratio}, min_channels={self.min_channels} and round_to={self.round_to}; "
            "raise max_layer_ratio, lower the target, or ignore fewer layers")

    def within(self, frac: float) -> bool:
        return self.target - self.tolerance <= frac <= self.target + self.tolerance

    # -- allocation 1: the raw global ranking

    def global_ranking(self) -> tuple[list[list[int]], list[list[int]]]:
        target, tolerance, round_to, sizes = self.target, self.tolerance, self.round_to, self.sizes

        def decide(n_remove: int, skip: frozenset[int] = frozenset(), n_impl: int | None = None):
            removed: list[list[int]] = [[] for _ in sizes]
            last, count = -1, 0
            for j in self.order:
                if count >= n_remove:
                    break
                gi = self.gof[j]
                if j not in skip and len(removed[gi]) < self.caps[gi]:
                    removed[gi].append(self.cof[j])
                    count += 1
                    last = j
            if round_to > 1:
                removed = [_round_removals(r, self.ranked[gi], sizes[gi], self.caps[gi], round_to)
                           for gi, r in enumerate(removed)]
            wanted = self.wanted_implants(removed)
            implanted = self.place_implants(removed, wanted if n_impl is None else n_impl)
            return removed, implanted, last, self.fraction(removed, implanted), wanted

        def smallest_reaching(skip: frozenset[int]) -> int:
            lo, hi = 0, self.structures.num_structures
            while lo < hi:  # smallest number of removals that reaches the target
                mid = (lo + hi) // 2
                if decide(mid, skip)[3] >= target:
                    hi = mid
                else:
                    lo = mid + 1
            return lo

        most = decide(self.structures.num_structures)[3]
        if most < target - tolerance:
            raise self.error_unreachable(most)
        skip: frozenset[int] = frozenset()
        best = None
        for _ in range(200):
            candidate = decide(smallest_reaching(skip), skip)
            if best is None or abs(candidate[3] - target) < abs(best[3] - target):
                best = candidate
            if self.within(candidate[3]) or candidate[2] < 0:
                break
            # the last structure overshoots the budget: keep it and take the next ones in rank order instead
            skip = skip | {candidate[2]}
        if not self.within(best[3]) and self.implant_ratio > 0:
            # an implant of a large structure can jump past the budget: try fewer implants near the boundary
            n0 = sum(len(r) for r in best[0])
            for n in range(max(0, n0 - 3), n0 + 4):
                for k in range(int(round(self.implant_ratio * n)), -1, -1):
                    candidate = decide(n, skip, k)
                    if abs(candidate[3] - target) < abs(best[3] - target):
                        best = candidate
        removed, implanted, _, frac, wanted = best
        self.asked_implants = wanted
        if abs(frac - target) > tolerance and target > 0:
            raise _coarse(frac, target, self.budget, tolerance, round_to)
        return removed, implanted

    # -- allocation 2: the cost-aware knapsack

    def cost_aware(self) -> tuple[list[list[int]], list[list[int]]]:
        target, tolerance = self.target, self.tolerance
        if target == 0:
            return [[] for _ in self.sizes], [[] for _ in self.sizes]
        moves = _Knapsack(self).run()
        n_moves = len(moves)

        def removed_after(k: int) -> list[list[int]]:
            r = [0] * len(self.sizes)
            for gi, n in moves[:k]:
                r[gi] = n
            return [self.ranked[gi][:n] for gi, n in enumerate(r)]

        def decide(k: int, n_impl: int | None = None):
            removed = removed_after(k)
            wanted = self.wanted_implants(removed)
            implanted = self.place_implants(removed, wanted if n_impl is None else n_impl)
            return removed, implanted, self.fraction(removed, implanted), wanted

        best = decide(n_moves)
        if self.implant_ratio > 0 and any(self.implantable):
            # implants save cost too: the first prefix of the knapsack's moves that reaches the target with them
            lo, hi = 0, n_moves
            while lo < hi:
                mid = (lo + hi) // 2
                if decide(mid)[2] >= target:
                    hi = mid
                else:
                    lo = mid + 1
            best = None
            for k in range(max(0, lo - 2), min(n_moves, lo + 2) + 1):
                cand = decide(k)
                if best is None or abs(cand[2] - target) < abs(best[2] - target):
                    best = cand
            if not self.within(best[2]):
                # an implant of a large structure can jump past the budget: try fewer implants near the boundary
                for k in range(max(0, lo - 3), min(n_moves, lo + 3) + 1):
                    for m in range(self.wanted_implants(removed_after(k)), -1, -1):
                        cand = decide(k, m)
                        if abs(cand[2] - target) < abs(best[2] - target):
                            best = cand
        removed, implanted, frac, wanted = best
        self.asked_implants = wanted
        if abs(frac - target) > tolerance:
            raise _coarse(frac, target, self.budget, tolerance, self.round_to)
        return removed, implanted


class _Knapsack:
    """Greedy knapsack over moves (group gi to ``r`` removed channels, its ``r`` least important first): per step
    the move with the least summed score per unit of budget saved; moves that would overshoot the target by more
    than the tolerance are passed over while others remain. The budget's measure is evaluated in closed form per
    group (vectorised over the group's widths), exact with respect to the other groups' current widths."""

    def __init__(self, solver: _Solver):
        self.s = solver
        cost = solver.cost
        self.cost = cost
        sizes = solver.sizes
        self.r = [0] * len(sizes)
        self.prefix = [np.concatenate([[0.0], np.cumsum(sc)]) for sc in solver.ranked_scores]
        # kept positions of every slice after its group's r least important channels are removed, r = 0..size
        self.kept_curve = []
        for sl in cost.slices:
            order = solver.ranked[sl.group]
            self.kept_curve.append(sl.total - np.concatenate([[0], np.cumsum(sl.per_channel[order])]))
        self.options = [np.array([r for r in range(1, cap + 1) if (size - r) % solver.round_to == 0], dtype=np.int64)
                        for size, cap in zip(sizes, solver.caps)]
        if solver.which is None:
            self.weight = None
            self.units = cost.group_layers
        else:
            self.weight = [1 if solver.which == 0 else t.spatial for t in cost.tensors]
            self.units = [[ti for ti in tis if self.weight[ti]] for tis in cost.group_tensors]
        share: list[set[int]] = [set() for _ in sizes]  # groups whose measure terms overlap each group's
        holders: dict[Any, set[int]] = {}
        for gi, units in enumerate(self.units):
            for u in units:
                holders.setdefault(u, set()).add(gi)
        for gs in holders.values():
            for gi in gs:
                share[gi] |= gs
        self.share = share

    def kept(self) -> list[int]:
        return [int(c[self.r[sl.group]]) for c, sl in zip(self.kept_curve, self.cost.slices)]

    def total(self) -> float:
        kept = self.kept()
        if self.weight is None:
            return self.cost.latency_table.total_ms(self.cost._widths(kept))
        sizes = self.cost._tensor_sizes(kept, [0] * self.cost.num_groups, [0] * self.cost.num_groups, "1x1")
        return float(sum(n * w for n, w in zip(sizes, self.weight)))

    def curve(self, gi: int, rs: np.ndarray, kept: list[int]) -> np.ndarray:
        """The group's terms of the measure with ``rs[k]`` of its channels removed (others as they are)."""
        slices = self.cost.slices
        if self.weight is None:
            out = np.zeros(len(rs))
            table = self.cost.latency_table
            for name in self.units[gi]:
                widths = []
                for extra, ids, scale in self.cost._layer_dims[name]:
                    w = np.full(len(rs), float(extra + sum(kept[s] for s in ids if slices[s].group != gi)))
                    for s in ids:
                        if slices[s].group == gi:
                            w = w + self.kept_curve[s][rs]
                    widths.append(scale * w)
                lt = table.layers[name]
                out += np.array([lt(a, b) for a, b in zip(*widths)])
            return out
        out = np.zeros(len(rs))
        for ti in self.units[gi]:
            t = self.cost.tensors[ti]
            n = np.full(len(rs), float(t.const) * self.weight[ti])
            for extra, ids in t.dims:
                w = np.full(len(rs), float(extra + sum(kept[s] for s in ids if slices[s].group != gi)))
                for s in ids:
                    if slices[s].group == gi:
                        w = w + self.kept_curve[s][rs]
                n = n * w
            out += n
        return out

    def moves(self, gi: int, kept: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score per unit saved, removals, saved) of every move of group gi that saves something."""
        rs = self.options[gi]
        rs = rs[rs > self.r[gi]]
        if not len(rs) or not self.units[gi]:
            return np.empty(0), rs[:0], np.empty(0)
        values = self.curve(gi, np.concatenate([[self.r[gi]], rs]), kept)
        saved = values[0] - values[1:]
        ok = saved > 1e-12 * max(abs(values[0]), 1.0)
        rs, saved = rs[ok], saved[ok]
        ratio = (self.prefix[gi][rs] - self.prefix[gi][self.r[gi]]) / saved
        return ratio, rs, saved

    def run(self) -> list[tuple[int, int]]:
        s = self.s
        dense = self.total()
        goal = (1.0 - s.target) * dense
        low = goal - s.tolerance * dense  # below this the target is overshot
        cur = dense
        kept = self.kept()
        open_moves = [self.moves(gi, kept) for gi in range(len(s.sizes))]
        moves: list[tuple[int, int]] = []
        while cur > goal + 1e-12 * dense:
            best = fit = None
            for gi, (ratio, rs, saved) in enumerate(open_moves):
                if not len(rs):
                    continue
                i = int(np.argmin(ratio))
                if best is None or ratio[i] < best[0]:
                    best = (float(ratio[i]), gi, int(rs[i]))
                fitting = cur - saved >= low
                if fitting.any():
                    k = int(np.argmin(np.where(fitting, ratio, np.inf)))
                    if fit is None or ratio[k] < fit[0]:
                        fit = (float(ratio[k]), gi, int(rs[k]))
            choice = fit or best
            if choice is None:
                raise s.error_unreachable(1.0 - cur / dense)
            _, gi, r = choice
            self.r[gi] = r
            moves.append((gi, r))
            cur = self.total()
            kept = self.kept()
            for gj in self.share[gi] | {gi}:
                open_moves[gj] = self.moves(gj, kept)
        return moves


def _coarse(frac: float, target: float, budget: str, tolerance: float, round_to: int) -> BudgetError:
    return BudgetError(f"the plan removes {frac:.2%} of {budget}, not within {tolerance:.0%} of {target:.0%}; "
                       "the structures are too coarse for this target"
                       + (f" with round_to={round_to}; use a smaller round_to" if round_to > 1 else "")
                       + " (or pass a larger tolerance)")


def _finish_plan(structures: StructureSet, cost: CostModel, removed: list[list[int]], implanted: list[list[int]],
                 implant_kind: str, target: float, budget: str, criterion: str, seed: int, round_to: int,
                 allocation: str, notes: list[str]) -> Plan:
    p_after, f_after = cost.count(implanted=[len(i) for i in implanted], kind=implant_kind, removed=removed)
    p0, f0 = cost.dense()
    achieved = {"params_before": p0, "params_after": p_after, "params_removed": 1 - p_after / p0,
                "flops_before": f0, "flops_after": f_after, "flops_removed": 1 - f_after / max(f0, 1)}
    if cost.latency_table is not None:
        l0, l1 = cost.latency_ms(list(cost.sizes)), cost.latency_ms(removed=removed)
        achieved.update(latency_before_ms=l0, latency_after_ms=l1, latency_removed=1 - l1 / l0)
    return Plan(
        groups={n: GroupPlan(g.size, sorted(r), sorted(i))
                for n, g, r, i in zip(structures.names, structures, removed, implanted)},
        implant_kind=implant_kind, target=target, budget=budget, criterion=criterion, seed=seed,
        round_to=round_to, achieved=achieved, allocation=allocation, notes=notes,
    )
