"""Head importance of Michel et al. (2019), "Are Sixteen Heads Really Better than One?", as a baseline.

A gate xi_h multiplies head h's context before the output projection; importance is the expected absolute
gradient of the loss with respect to the gate at xi = 1, accumulated per batch as in the authors' code, then
normalised per layer by the L2 norm. Scaling a unit's context by xi is scaling its output-projection columns by
xi, so dL/dxi_h = sum over those columns of w * dL/dw: no hooks or ``head_mask`` needed, and the same formula
gives FFN neurons' gate importance (their down-projection columns).

The structured OBS saliency (:func:`obs_importance`) is the surgeon's view of a unit: with H the Gram matrix of
the consumer layer's input over calibration tokens (the output projection's input, i.e. the concatenated head
contexts; the down projection's input for FFN neurons; centred when the layer has a bias, padding excluded) and
W_S the consumer's columns of unit S, removing S and refitting every other column (and the bias) raises the
layer's squared reconstruction error by exactly  sum_i w_iS^T [(H^-1)_SS]^-1 w_iS  (one term per output i).
``hap-obs`` weights output i's term by the loss's curvature with respect to that output (the diagonal empirical
Fisher of the block output over the same tokens), so the score estimates the loss increase after compensation
rather than the reconstruction error of a layer whose importance to the loss it cannot see.

Every criterion takes an optional ``group`` (:mod:`haprune.distributed`): every rank passes the same batches, takes
its round-robin shard of them, and the per-unit sums (gate gradients, Gram matrices, output Fisher) are all-reduced,
so the scores equal the single-process ones on the same batches.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .. import distributed
from ..estimate import Sensitivity
from ..estimate.base import Batch, LossFn, check_loss, default_loss, materialise_batches
from ..graph import StructureSet, eval_mode, model_device

__all__ = ["michel_importance", "unit_importance", "obs_importance", "UNIT_CRITERIA"]

# name -> what it computes (every one returns a Sensitivity, higher = keep)
UNIT_CRITERIA = {
    "hap": "Tr(H_s)/n_s * ||w_s||^2 with Hutchinson block traces (the paper)",
    "hap-ggn": "the same score on exact Gauss-Newton block traces (positive semi-definite)",
    "michel": "Michel et al. (2019): expected |dL/d gate|, layer-normalised",
    "magnitude": "squared L2 norm of the unit's weights",
    "random": "uniform, seeded",
    "obs": "structured OBS: increase of the consumer's squared reconstruction error after the optimal refit",
    "hap-obs": "structured OBS weighted per output by the loss curvature (diagonal Fisher) of the block output",
}


def michel_importance(model: nn.Module, structures: StructureSet, batches: list[Batch], *,
                      loss_fn: LossFn | None = None, normalize_layers: bool = True,
                      num_batches: int | None = None, group: Any = None) -> Sensitivity:
    """Michel et al.'s head (and FFN-neuron) importance for every structure of ``structures``."""
    loss_fn = loss_fn or default_loss
    data = _shard(batches, model, num_batches, group)
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
    distributed.all_reduce(scores, group)
    if normalize_layers:
        for g in structures:
            sl = slice(structures.offsets[g.name], structures.offsets[g.name] + g.size)
            norm = scores[sl].norm()
            if norm > 0:
                scores[sl] /= norm
    counts = distributed.all_reduce(torch.tensor([len(data), sum(len(y) for _, y in data)]), group).tolist()
    info: dict[str, Any] = {"batches": counts[0], "samples": counts[1], "normalize_layers": normalize_layers}
    return Sensitivity("michel", scores, info=info)


def unit_importance(model: nn.Module, structures: StructureSet, batches: list[Batch], criterion: str, *,
                    seed: int = 0, probes: int = 8, progress: bool = False, sequential: bool = True,
                    group: Any = None) -> Sensitivity:
    """Score heads / FFN neurons with one of :data:`UNIT_CRITERIA` (``probes``: Hutchinson probes per batch;
    ``sequential``: the OBS criteria's greedy removal order, see :func:`obs_importance`; ``group``: spread over
    the ranks of a process group, see the module docstring)."""
    from ..estimate import estimate

    if criterion == "hap":
        return estimate(model, structures, batches, "hutchinson", seed=seed, min_probes=probes,
                        max_probes=probes, progress=progress, group=group)
    if criterion == "hap-ggn":
        return estimate(model, structures, batches, "ggn", progress=progress, group=group)
    if criterion == "michel":
        return michel_importance(model, structures, batches, group=group)
    if criterion == "magnitude":
        return estimate(model, structures, batches, "l2", progress=progress)
    if criterion in ("obs", "hap-obs"):
        return obs_importance(model, structures, batches, curvature="fisher" if criterion == "hap-obs" else None,
                              sequential=sequential, group=group)
    if criterion == "random":
        return estimate(model, structures, batches, "random", seed=seed, progress=progress)
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(UNIT_CRITERIA)}")


def _shard(batches: Any, model: nn.Module, num_batches: int | None, group: Any) -> list[Batch]:
    """This rank's batches (all of them without a group), checked and on the model's device; a rank left without
    a batch is refused on every rank."""
    mine = list(distributed.shard(batches, group, limit=num_batches))
    if distributed.world(group) > 1 and int(distributed.all_reduce_min(torch.tensor([len(mine)]), group)) == 0:
        raise ValueError(f"{distributed.world(group)} processes need at least as many calibration batches (one per "
                         "process): pass more or smaller batches")
    return distributed.raise_together(lambda: materialise_batches(mine, model_device(model)), group)


def _consumer_slice(g) -> Any:
    consumer = [s for s in g.param_slices if s.dim == 1 and s.tensor.endswith(".weight")]
    if len(consumer) != 1:
        raise ValueError(f"{g.name}: expected one output-projection slice, found {len(consumer)}")
    return consumer[0]


@torch.no_grad()
def _output_fisher(model: nn.Module, layers: list[str], data: list[Batch], loss_fn: LossFn, mask_fn,
                   group: Any = None) -> dict:
    """Per layer: sum over calibration tokens (padding excluded) of (dL/dy_i)^2 for each output i of the layer,
    and the number of tokens."""
    from .compensate import token_rows as rows_of

    mods = {n: model.get_submodule(n) for n in layers}
    fisher = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    tokens = 0
    outs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, inp, out):
            out.retain_grad()
            outs[name] = out
        return hook

    with eval_mode(model):
        for bi, (x, y) in enumerate(data):
            mask = mask_fn(x)
            handles = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
            try:
                with torch.enable_grad():
                    loss = loss_fn(model(x), y)
                    check_loss(loss, bi)
                    loss.backward()
            finally:
                for h in handles:
                    h.remove()
            for n in layers:
                g = rows_of(outs[n].grad, mask).double().cpu()
                fisher[n] += (g * g).sum(0)
            tokens += int(rows_of(outs[layers[0]].grad, mask).shape[0]) if layers else 0
            outs.clear()
    model.zero_grad(set_to_none=True)
    distributed.all_reduce_dict(fisher, group)
    tokens = int(distributed.all_reduce(torch.tensor([tokens]), group))
    return {"fisher": fisher, "tokens": tokens}


class _ObsBlock:
    """One consumer layer's OBS state: weights, inverse Gram matrix, its units' columns, the units still there."""

    def __init__(self, weight: torch.Tensor, hinv: torch.Tensor, units: list[torch.Tensor], row_weight: torch.Tensor):
        self.w, self.hi, self.units, self.rw = weight.clone(), hinv.clone(), units, row_weight
        self.alive = list(range(len(units)))
        self.single = all(c.numel() == 1 for c in units)
        self.cols = torch.stack([c[0] for c in units]) if self.single else None
        self.refresh()

    def refresh(self) -> None:
        if self.single:  # one column per unit (FFN neurons): all costs at once
            idx = self.cols[self.alive]
            c = (self.rw @ self.w[:, idx].square()) / self.hi[idx, idx]
            self.costs = dict(zip(self.alive, c.clamp_min(0).tolist()))
        else:
            self.costs = {u: self.cost(u) for u in self.alive}
        self.best = min((c, u) for u, c in self.costs.items()) if self.costs else None

    def cost(self, u: int) -> float:
        """sum_i r_i w_iS^T [(H^-1)_SS]^-1 w_iS: the (weighted) error increase of removing unit u now."""
        cols = self.units[u]
        ws = self.w[:, cols]
        m = torch.linalg.inv(self.hi[cols][:, cols])
        return max(float(((ws @ m) * ws).sum(1) @ self.rw), 0.0)

    def remove(self, u: int) -> None:
        """Remove unit u with the OBS update: the other columns absorb it, the inverse loses its rows."""
        cols = self.units[u]
        m = torch.linalg.inv(self.hi[cols][:, cols])
        self.w = self.w - (self.w[:, cols] @ m) @ self.hi[cols]
        self.hi = self.hi - self.hi[:, cols] @ m @ self.hi[cols]
        self.w[:, cols] = 0
        self.hi[:, cols] = 0
        self.hi[cols] = 0
        self.alive.remove(u)
        self.refresh()


def _obs_greedy(blocks: list[_ObsBlock], min_units: int = 1) -> list[torch.Tensor]:
    """Global greedy OBS surgeon: remove the unit (of any block) whose removal now costs least, update its block,
    repeat; blocks keep ``min_units`` units until every block is down to them. A unit's score is the total
    predicted error of everything removed up to and including it (non-decreasing in removal order), so a global
    ranking of the scores replays the greedy order."""
    scores = [torch.zeros(len(b.units), dtype=torch.float64) for b in blocks]
    total = 0.0
    for floor in (min_units, 0):
        while True:
            cand = [(b.best[0], bi, b.best[1]) for bi, b in enumerate(blocks) if len(b.alive) > floor]
            if not cand:
                break
            c, bi, u = min(cand)
            total += c
            scores[bi][u] = total
            blocks[bi].remove(u)
    return scores


def obs_importance(model: nn.Module, structures: StructureSet, batches: list[Batch], *, ridge: float = 1e-4,
                   curvature: str | None = None, sequential: bool = True, loss_fn: LossFn | None = None,
                   mask_fn=None, num_batches: int | None = None, group: Any = None) -> Sensitivity:
    """Structured OBS saliency of every head / FFN neuron (see the module docstring); higher = keep.

    ``curvature``: ``None`` (every output of the consumer counts alike: the reconstruction error) or
    ``"fisher"`` (output i weighted by the mean over calibration tokens of (dL/dy_i)^2, which puts blocks on the
    loss's scale). ``sequential``: score in the greedy order of an OBS surgeon that removes one unit at a time
    (the cheapest in any block) and updates the rest of its block; each score is the total error of everything
    removed up to that unit, so a global ranking replays the surgeon's order (see :func:`_obs_greedy`).
    ``False``: every unit scored alone, against the full layer. ``ridge``:
    relative ridge on the Gram matrix (times its mean diagonal), as in compensation. ``mask_fn``: token mask of a
    batch (default: :func:`haprune.hf.compensate.packed_token_mask`).
    """
    from .compensate import collect_regressions, packed_token_mask

    if curvature not in (None, "fisher"):
        raise ValueError(f"curvature must be None or 'fisher', got {curvature!r}")
    mask_fn = mask_fn or packed_token_mask
    data = _shard(batches, model, num_batches, group)
    named = dict(model.named_parameters())
    consumers = {}
    for g in structures:
        s = _consumer_slice(g)
        consumers[g.name] = (s.tensor[: -len(".weight")], s)
    layers = sorted({c for c, _ in consumers.values()})
    regs = collect_regressions(model, data, layers, mask_fn=mask_fn, group=group)
    weights = {}
    if curvature == "fisher":
        fis = _output_fisher(model, layers, data, loss_fn or default_loss, mask_fn, group)
        weights = {n: f / max(1, fis["tokens"]) for n, f in fis["fisher"].items()}
    scores = torch.zeros(structures.num_structures, dtype=torch.float64)
    blocks: list[tuple[int, _ObsBlock]] = []
    for g in structures:
        name, s = consumers[g.name]
        reg = regs[name]
        h = reg.gram()
        lam = ridge * float(h.diagonal().mean().clamp_min(1e-30))
        hinv = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=torch.float64))
        w = named[s.tensor].detach().double().cpu()
        units = [s.idxs[s.root_idxs == u] for u in range(g.size)]
        rw = weights.get(name, torch.ones(w.shape[0], dtype=torch.float64))
        base = structures.offsets[g.name]
        state = _ObsBlock(w, hinv, units, rw)
        if sequential:
            blocks.append((base, state))
        else:
            scores[base: base + g.size] = torch.tensor([state.costs[u] for u in range(g.size)], dtype=torch.float64)
    if blocks:
        for (base, state), sc in zip(blocks, _obs_greedy([st for _, st in blocks])):
            scores[base: base + len(sc)] = sc
    info: dict[str, Any] = {"batches": int(distributed.all_reduce(torch.tensor([len(data)]), group)), "tokens": next(iter(regs.values())).count if regs else 0,
                            "ridge": ridge, "curvature": curvature or "none", "sequential": sequential}
    return Sensitivity("hap-obs" if curvature else "obs", scores, info=info)
