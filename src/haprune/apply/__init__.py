"""Apply: surgery that turns a model and a :class:`~haprune.plan.Plan` into a physically smaller model.

Data-free except for the optional least-squares implant initialisation. Steps, on a copy of the model:

1. For groups with implants, permute the group's channels to [kept | implanted | removed] in every coupled
   tensor (conv rows, BatchNorm parameters and statistics, consumers' input columns, residual partners); the
   function is unchanged.
2. Remove the planned channels with Torch-Pruning's per-op slicing (the dependency group removes them
   everywhere they are coupled).
3. Replace each implanted k x k conv by an :class:`ImplantConv2d` whose last channels are the implant.
4. ``lstsq`` init only: fit each implant to its original channel, then keep the fit only in the layers where it
   brings the network's output closer to the original one than the zero init does (see :func:`_select_implants`).

The user's model is never modified unless ``inplace=True``, and then only once the whole surgery succeeded.
After fine-tuning, :func:`merge_implants` gives the deployment form: each implanted layer as one k x k conv (the
implant's rows at the centre tap), the same function, as fast on the CPU as removal alone.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn as nn

from .. import distributed
from ..graph import Group, StructureSet, build_dependency_graph, build_structures, output_shapes, run_forward
from ..plan import Plan
from ..recover import batchnorm_stats_restored, reestimate_batchnorm
from .compensate import (COMPENSATE_MODES, CompensationError, CompensationResult, LayerNeed, calibration_requirements,
                         compensate, samples_needed)
from .implant import IMPLANT_INITS, ImplantConv2d, LstsqAccumulator, make_implant, merge_implants, set_implant_weight
from .regression import UndeterminedFitError

_compensate = compensate  # apply_plan's own argument is called ``compensate``

__all__ = ["apply_plan", "merge_implants", "ImplantConv2d", "IMPLANT_INITS", "PlanMismatchError", "compensate",
           "COMPENSATE_MODES", "CompensationResult", "CompensationError", "UndeterminedFitError", "channel_maps",
           "LayerNeed", "calibration_requirements", "samples_needed",
           "set_submodule"]


class PlanMismatchError(ValueError):
    """The plan was made for another model (a group is missing or has another size)."""


def apply_plan(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any,
    *,
    structures: StructureSet | None = None,
    implant_init: str = "zeros",
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    compensate: str | bool | None = None,
    compensate_options: dict[str, Any] | None = None,
    inplace: bool = False,
    group: Any = None,
) -> nn.Module:
    """Return the pruned (and implanted) model described by ``plan``.

    Args:
        example_inputs: a batch the model accepts (for tracing; batch 1 is enough).
        structures: the structures the plan was made from; rebuilt from the model when None (reloading).
        implant_init: ``zeros`` (official) or ``lstsq``: fit the 1 x 1 weights to the original channels on
            ``calibration`` by least squares, then, per implanted layer, keep the fit or fall back to zero, whichever
            makes the outputs on ``calibration`` (with BatchNorm statistics re-estimated there, as after pruning)
            more similar to the original model's; never worse than ``zeros`` by that measure.
        calibration: (inputs, targets) batches; needed for ``lstsq`` and ``compensate`` (kept in memory).
        compensate: refit the pruned layers to reproduce the original layers on ``calibration`` (see
            :func:`haprune.apply.compensate`): ``True`` or ``"sequential"``, ``"dense-inputs"``; None / False: off.
            Under compensation the implants are fit by least squares on the compensated inputs (whatever
            ``implant_init``) and the consumer layers use them as regressors. The result (layers, errors, time) is
            recorded on the returned model as the dict attribute ``haprune_compensation``.
        compensate_options: passed to :func:`compensate` (``ridge``, ``layers``, ``progress``, ``chunk_rows``).
        inplace: modify ``model`` itself (only after the surgery succeeded on a copy).
        group: a process group (:mod:`haprune.distributed`): every rank passes the same model, plan and
            ``calibration`` and applies the same surgery; the calibration statistics (the implants' least-squares
            normal equations, the output similarities and BatchNorm re-estimation of the implant choice, the
            compensation's normal equations) are summed over the ranks' round-robin shards, so every rank gets the
            same model, the one a single process gets on the same data (up to summation order).
    """
    if implant_init not in IMPLANT_INITS:
        raise ValueError(f"implant_init must be one of {IMPLANT_INITS}, got {implant_init!r}")
    if implant_init == "lstsq" and calibration is None and any(g.implant for g in plan.groups.values()):
        raise ValueError("implant_init='lstsq' needs calibration batches (inputs the model accepts)")
    mode = _compensate_mode(compensate)
    if mode is not None:
        if calibration is None:
            raise ValueError(f"compensate={compensate!r} needs calibration batches (inputs the model accepts), "
                             f"e.g. calibration=[(x, y), ...]")
        calibration = list(calibration)
        if not calibration:
            raise CompensationError("compensate needs calibration data: the calibration batches are empty")
    for name, gp in plan.groups.items():
        if mode is None and implant_init == "zeros" and gp.implant and not gp.keep:
            raise PlanMismatchError(
                f"group {name!r} keeps no channel, only {len(gp.implant)} zero-initialised implants: its output "
                f"would be constant until fine-tuning; keep a channel there, or use implant_init='lstsq' or "
                f"compensate=True (which fit the implants)")
    work = copy.deepcopy(model)
    modes = {name: m.training for name, m in work.named_modules()}
    work.eval()
    with torch.no_grad():
        ref_shapes = output_shapes(run_forward(work, example_inputs))
    fit = implant_init == "lstsq" and mode is None and any(g.implant for g in plan.groups.values())
    if fit:
        calibration = list(calibration)
        mine = list(distributed.shard(calibration, group))
        reference = _outputs(work, mine)  # the original model's outputs, for the per-layer choice
    if structures is None:
        structures = build_structures(work, example_inputs, ignored_layers=[], check_surgery=False)
    groups = _match(plan, structures)

    kept_in, kept_out = channel_maps(work, groups) if mode is not None else ({}, {})
    for g, gp in groups:
        if gp.implant:
            _permute_group(work, g, gp.keep + gp.implant + gp.remove)
    dg = build_dependency_graph(work, example_inputs)
    for g, gp in groups:
        if not gp.remove:
            continue
        alive = len(gp.keep) + len(gp.implant)
        # root channels: a grouped convolution's structure is a bundle of channels (graph.Group.channels)
        idxs = list(range(alive, g.size)) if gp.implant else g.channels(gp.remove)
        root = work.get_submodule(g.name)
        pruner = dg.get_pruner_of_module(root)
        dg.get_pruning_group(root, pruner.prune_out_channels, idxs).prune()

    implanted = [(m, len(gp.implant)) for g, gp in groups if gp.implant for m in g.implantable]
    fits: dict[str, LstsqAccumulator] = {}
    if implanted and fit:
        fits = _collect_lstsq(work, implanted, mine)
        for name in sorted(fits):
            fits[name].regression.all_reduce(group)
    for name, m in implanted:
        conv = work.get_submodule(name)
        new = make_implant(conv, m, plan.implant_kind)
        if name in fits:
            set_implant_weight(new, fits[name].solve())
        set_submodule(work, name, new)
    if fits:
        _select_implants(work, list(fits), calibration, reference, group)
    if mode is not None:
        result = _compensate(model, work, calibration, mode=mode, kept_inputs=kept_in, kept_outputs=kept_out,
                             group=group, **(compensate_options or {}))
        work.haprune_compensation = result.to_dict()

    with torch.no_grad():
        shapes = output_shapes(run_forward(work, example_inputs))
    if shapes != ref_shapes:
        raise RuntimeError(f"surgery changed the output shape from {ref_shapes} to {shapes}; please report this")
    for name, m in work.named_modules():  # every submodule's own flag back (implants follow the conv they replace)
        m.training = modes.get(name, modes.get(name.rpartition(".")[0], m.training))
    if inplace:
        model.__dict__.update(work.__dict__)
        return model
    return work


def _compensate_mode(compensate: str | bool | None) -> str | None:
    if compensate is None or compensate is False:
        return None
    if compensate is True:
        return "sequential"
    if compensate not in COMPENSATE_MODES:
        raise ValueError(f"compensate must be True, False, None or one of {COMPENSATE_MODES}, got {compensate!r}")
    return compensate


def channel_maps(model: nn.Module, groups: list[tuple[Group, Any]]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """For each Conv2d / Linear whose input (output) channels a plan changes: the original channel index of each
    input (output) channel after surgery, in the pruned layer's order ([kept | implanted] for implanted groups).

    ``model`` is the unpruned model; ``groups`` the (Group, GroupPlan) pairs of the plan. Returns (inputs, outputs),
    the ``kept_inputs`` / ``kept_outputs`` of :func:`compensate`.
    """
    maps: dict[tuple[str, int], list[int]] = {}
    deleted: dict[tuple[str, int], set[int]] = {}
    for g, gp in groups:
        if not gp.remove and not gp.implant:
            continue
        if g.channel_groups > 1:  # bundles (no implants): surviving root channels keep their order
            rank = {c: c for c in g.channels(gp.keep)}
        else:
            rank = {c: i for i, c in enumerate(list(gp.keep) + list(gp.implant))}
        for s in g.param_slices:
            mod, _, leaf = s.tensor.rpartition(".")
            if leaf != "weight" or s.dim not in (0, 1):
                continue
            m = model.get_submodule(mod)
            if not (isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1)):
                continue
            key = (mod, s.dim)
            arr = maps.setdefault(key, list(range(m.weight.shape[s.dim])))
            positions = sorted(s.idxs.tolist())
            alive = sorted((rank[int(r)], int(i)) for i, r in zip(s.idxs.tolist(), s.root_idxs.tolist())
                           if int(r) in rank)
            for slot, (_, src) in zip(positions, alive):
                arr[slot] = src
            deleted.setdefault(key, set()).update(positions[len(alive):])
    ins: dict[str, list[int]] = {}
    outs: dict[str, list[int]] = {}
    for (mod, dim), arr in maps.items():
        gone = deleted.get((mod, dim), set())
        (outs if dim == 0 else ins)[mod] = [arr[p] for p in range(len(arr)) if p not in gone]
    return ins, outs


def _match(plan: Plan, structures: StructureSet) -> list[tuple[Group, Any]]:
    out = []
    for name, gp in plan.groups.items():
        try:
            g = structures[name]
        except KeyError:
            raise PlanMismatchError(
                f"the plan names group {name!r}, which this model does not have; was it made for another model?"
            ) from None
        if g.size != gp.size:
            raise PlanMismatchError(f"group {name!r} has {g.size} channels here but {gp.size} in the plan")
        bad = [i for i in gp.remove + gp.implant if not 0 <= i < g.size]
        if bad or len(set(gp.remove) | set(gp.implant)) != len(gp.remove) + len(gp.implant):
            raise PlanMismatchError(f"group {name!r}: channel indices out of range or listed twice")
        if not gp.keep and not gp.implant:
            raise PlanMismatchError(f"group {name!r}: the plan removes every channel")
        if gp.implant and not g.implantable:
            raise PlanMismatchError(f"group {name!r} has no k x k conv to implant into")
        out.append((g, gp))
    return out


def _permute_group(model: nn.Module, group: Group, order: list[int]) -> None:
    """Reorder the group's channels to ``order`` (old channel index at each new position) in every tensor."""
    rank = torch.empty(group.size, dtype=torch.long)
    rank[torch.as_tensor(order)] = torch.arange(group.size)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for s in group.slices:
        t = tensors[s.tensor]
        # positions of this tensor owned by the group, filled in the new channel order (stable within a channel)
        positions = torch.sort(s.idxs).values
        key = rank[s.root_idxs] * (s.idxs.max() + 1) + s.idxs
        sources = s.idxs[torch.argsort(key)]
        src = torch.arange(t.shape[s.dim])
        src[positions] = sources
        with torch.no_grad():
            t.copy_(t.index_select(s.dim, src.to(t.device)))


def _collect_lstsq(model: nn.Module, implanted: list[tuple[str, int]],
                   calibration: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, LstsqAccumulator]:
    fits = {name: LstsqAccumulator(model.get_submodule(name), m) for name, m in implanted}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, n=name: fits[n].add(inp[0].detach(), out.detach())) for name in fits]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for x, _ in calibration:
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return fits


def _flat_outputs(out: Any) -> torch.Tensor:
    """A model output (tensor, or tuple / list / dict of them) as one (batch, features) float64 tensor."""
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(out.shape[0], -1).double().cpu()
    if isinstance(out, dict):
        out = list(out.values())
    parts = [_flat_outputs(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))]
    return torch.cat(parts, 1)


def _outputs(model: nn.Module, calibration: list) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        return [_flat_outputs(model(x.to(device))) for x, _ in calibration]


def _output_similarity(model: nn.Module, calibration: list, reference: list[torch.Tensor], group: Any = None) -> float:
    """Mean cosine similarity of ``model``'s per-sample outputs to ``reference`` (each centred over its features),
    with the model's BatchNorm statistics re-estimated on ``calibration`` first (and put back afterwards).

    Centring makes it shift invariant (softmax is) and the cosine scale invariant: a pruned network's logits are
    often much smaller than the original's but still well ordered, and any error-based score (MSE, KL, CE) then
    prefers a confidently wrong model. Measured on ResNet-20 / Fashion-MNIST, the cosine ranked the inits in the
    order of their test accuracies where the KL to the original and the cross-entropy ranked them in reverse.
    With ``group``: ``calibration`` is every rank's full list, ``reference`` this rank's shard's outputs; the
    re-estimation and the sums cover all the ranks' shards.
    """
    with batchnorm_stats_restored(model):
        reestimate_batchnorm(model, calibration, group=group)  # a no-op for a model without BatchNorm
        total, count = 0.0, 0
        for out, ref in zip(_outputs(model, list(distributed.shard(calibration, group))), reference):
            out, ref = out - out.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
            total += float(torch.nn.functional.cosine_similarity(out, ref, dim=1, eps=1e-12).sum())
            count += out.shape[0]
    sums = distributed.all_reduce(torch.tensor([total, count], dtype=torch.float64), group).tolist()
    return sums[0] / max(sums[1], 1)


def _implant_weight(module: ImplantConv2d) -> torch.Tensor:
    return (module.implant[0] if isinstance(module.implant, nn.Sequential) else module.implant).weight


def _select_implants(model: nn.Module, names: list[str], calibration: list, reference: list[torch.Tensor],
                     group: Any = None) -> None:
    """Per implanted layer, keep the least-squares fit or set the implant back to zero (the official init).

    Reproducing a pruned channel is not always better than dropping it: after pruning, BatchNorm statistics are
    re-estimated, and the BatchNorm after the implant's consumer rescales whatever partial sum survives to the
    full variance. On ResNet-20 (Fashion-MNIST, HAP plan at 50%) the last block keeps no k x k channel of its
    first conv, only 7 implants; reproducing them, even exactly, gives a distorted residual branch that the
    re-estimated BatchNorm amplifies (82.1% one-shot with the exact channels, 78.9% with only that layer exact)
    while a zero implant makes the branch constant and the block an identity (87.3%). So the fit is kept per layer
    only where it raises :func:`_output_similarity` to the original model: greedy over the layers (in the plan's
    order), starting from every fit kept, then compared with all zeros; ties keep the fit. Costs ``len(names) + 2`` passes of re-estimation and
    inference over the calibration batches.
    """
    weights = {n: _implant_weight(model.get_submodule(n)) for n in names}
    fitted = {n: w.detach().clone() for n, w in weights.items()}

    def use(zeroed: set[str]) -> None:
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(torch.zeros_like(w) if n in zeroed else fitted[n])

    def score(zeroed: set[str]) -> float:
        use(zeroed)
        return _output_similarity(model, calibration, reference, group)

    zeroed: set[str] = set()
    best = score(zeroed)
    for n in names:
        s = score(zeroed | {n})
        if s > best:
            best, zeroed = s, zeroed | {n}
    if len(zeroed) < len(names) and score(set(names)) > best:
        zeroed = set(names)
    use(zeroed)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at the fully-qualified ``name`` of ``model`` by ``new``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
