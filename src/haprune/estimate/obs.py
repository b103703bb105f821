"""Structured OBS saliency: what a channel costs when the layers reading it are refit without it.

For a consumer layer (a Conv2d with groups 1, or a Linear) of a group's channels, with input Gram matrix
``H = X^T X`` (X: the layer's inputs over the calibration data, a conv's input unfolded into k x k patches and
centred, so the bias absorbs mean shifts) and weight ``W`` (out x columns), removing the columns ``s`` of one
channel (its k*k patch columns) and refitting the others by least squares increases the layer's squared
reconstruction error by exactly

    delta_s = sum_o  w_{o,s}^T [(H^-1)_{ss}]^-1 w_{o,s}

(Optimal Brain Surgeon for a block, summed over output rows: Kurtic et al.'s ZipLM, Frantar & Alistarh's OBC).
:func:`obs_saliency` sums it over a group's consumers. The plain sum mixes layers whose output errors matter
differently to the loss; with ``output_weights`` each consumer output row ``o`` is weighted by an estimate of the
loss curvature per unit of squared output error (see :func:`output_curvature`: from the exact GGN diagonal of the
consumer's weights, ``h_o = sum_i GGN[o, i] / sum_i E[x_i^2]``, the Kronecker-factored reading of the GGN), which
turns every delta into loss units: ``1/2 sum_o h_o delta_{o,s}``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..graph import Group, StructureSet, eval_mode, model_device

__all__ = ["obs_saliency", "output_curvature", "patches", "consumers", "consumer_grams", "InputGram"]

Batch = tuple[torch.Tensor, torch.Tensor]


def patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``F.unfold(x, ...)`` with a conv's geometry, as (samples x positions, channels x kh x kw) float64 rows,
    columns ordered like ``conv.weight.reshape(out, -1)``. Built from k*k strided slices of the padded input
    (``F.unfold`` measured 30x slower on this machine's CPU)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    out = torch.empty(n, ho, wo, c, kh, kw, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            out[..., i, j] = xp[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return out.reshape(n * ho * wo, c * kh * kw)


def _layer_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
    return patches(x, m)


def _is_consumer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
                                         and not isinstance(m.padding, str))


def consumers(model: nn.Module, group: Group) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The layers whose input columns (weight dim 1) belong to ``group``: (name, positions, channel of each)."""
    out = []
    for s in group.param_slices:
        mod, _, leaf = s.tensor.rpartition(".")
        if leaf == "weight" and s.dim == 1 and _is_consumer(model.get_submodule(mod)):
            out.append((mod, s.idxs, s.root_idxs))
    return out


class InputGram:
    """Raw sums for a layer's centred input Gram matrix and its uncentred diagonal (float64)."""

    def __init__(self, d: int):
        self.s = torch.zeros(d, dtype=torch.float64)
        self.ss = torch.zeros(d, d, dtype=torch.float64)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        self.s += rows.sum(0)
        self.ss += rows.T @ rows
        self.n += rows.shape[0]

    def centred(self) -> torch.Tensor:
        mean = self.s / max(self.n, 1)
        return self.ss - self.n * torch.outer(mean, mean)


def _grams(model: nn.Module, names: list[str], batches: list[Batch], chunk_rows: int,
           progress: bool, group: distributed.Group = None) -> dict[str, InputGram]:
    mods = {n: model.get_submodule(n) for n in names}
    grams: dict[str, InputGram] = {}

    def hook(mod, inp, out, n):
        x = inp[0].detach()
        per_sample = _layer_rows(mod, x[:1]).shape[0]
        per = max(1, chunk_rows // max(per_sample, 1))
        for s in range(0, x.shape[0], per):
            rows = _layer_rows(mod, x[s:s + per])
            if n not in grams:
                grams[n] = InputGram(rows.shape[1])
            grams[n].add(rows)

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in mods.items()]
    device = model_device(model)
    try:
        with torch.no_grad(), eval_mode(model):
            for x, _ in tqdm(batches, desc="obs grams", disable=not progress, leave=False):
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if distributed.world(group) > 1:  # every rank's sums over its shard of the batches, added up
        widths = distributed.all_gather_json({n: g.s.numel() for n, g in grams.items()}, group)
        for table in widths:
            for n, d in table.items():
                grams.setdefault(n, InputGram(d))
        counts = torch.tensor([grams[n].n for n in sorted(grams)], dtype=torch.int64)
        distributed.all_reduce(counts, group)
        distributed.all_reduce_dict({**{f"s/{n}": g.s for n, g in grams.items()},
                                     **{f"ss/{n}": g.ss for n, g in grams.items()}}, group)
        for n, c in zip(sorted(grams), counts.tolist()):
            grams[n].n = c
    return grams


def _columns(m: nn.Module, positions: torch.Tensor, channels: torch.Tensor, size: int) -> list[torch.Tensor]:
    """For each channel of the group, the weight-matrix columns (of ``weight.reshape(out, -1)``) it owns."""
    taps = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]
    cols: list[list[int]] = [[] for _ in range(size)]
    for p, r in zip(positions.tolist(), channels.tolist()):
        cols[r].extend(range(p * taps, (p + 1) * taps))
    return [torch.as_tensor(sorted(c), dtype=torch.long) for c in cols]


def _block_obs(h: torch.Tensor, w: torch.Tensor, cols: list[torch.Tensor], ridge: float,
               row_weights: torch.Tensor | None) -> torch.Tensor:
    """delta_s = sum_o r_o w_{o,s}^T [(H^-1)_ss]^-1 w_{o,s} for every channel's column block s."""
    d = h.shape[0]
    # a floor of 1e-10 keeps dead inputs (constant over the calibration data: removing them costs nothing) invertible
    lam = max(ridge, 1e-10) * float(h.diagonal().mean().clamp_min(1e-30))
    hinv = torch.linalg.inv(h + lam * torch.eye(d, dtype=torch.float64))
    hinv = (hinv + hinv.T) / 2
    out = torch.zeros(len(cols), dtype=torch.float64)
    rw = torch.ones(w.shape[0], dtype=torch.float64) if row_weights is None else row_weights.double()
    sizes = {len(c) for c in cols}
    if len(sizes) == 1 and 0 not in sizes:  # every channel the same number of columns: batched
        idx = torch.stack(cols)  # (C, b)
        blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (C, b, b)
        ws = w[:, idx]  # (out, C, b)
        sol = torch.linalg.solve(blocks, (ws * rw[:, None, None]).permute(1, 2, 0))  # (C, b, out)
        return (ws.permute(1, 2, 0) * sol).sum((1, 2))
    for j, c in enumerate(cols):
        if len(c) == 0:
            continue
        ws = w[:, c]  # (out, b)
        sol = torch.linalg.solve(hinv[c][:, c], (ws * rw[:, None]).T)
        out[j] = (ws.T * sol).sum()
    return out


def consumer_grams(model: nn.Module, structures: StructureSet, batches: Iterable[Batch], *,
                   chunk_rows: int = 65536, progress: bool = False,
                   group: distributed.Group = None) -> dict[str, InputGram]:
    """Every consumer layer's input Gram sums over ``batches`` (one forward pass), to share between
    :func:`obs_saliency` and :func:`output_curvature` (with ``group``: summed over every rank's batches)."""
    names = sorted({n for g in structures for n, _, _ in consumers(model, g)})
    return _grams(model, names, list(batches), chunk_rows, progress, group)


def output_curvature(model: nn.Module, structures: StructureSet, diag: dict[str, torch.Tensor],
                     batches: Iterable[Batch], *, chunk_rows: int = 65536, progress: bool = False,
                     grams: dict[str, InputGram] | None = None,
                     group: distributed.Group = None) -> dict[str, torch.Tensor]:
    """Per consumer layer, ``h_o = sum_i GGN[o, i] / sum_i E_rows[x_i^2]``: the loss curvature per unit of
    squared error in output row ``o`` (per calibration row), from a GGN (or Fisher) diagonal ``diag`` of the
    weights (``haprune.estimate.curvature.ggn(...)["diag"]``, the mean loss over samples). Under the
    Kronecker-factored reading GGN[o, i] = E_n[sum_positions g_o^2 x_i^2] ~ h_o E[x_i^2] * positions, so the ratio
    recovers the mean output curvature per row (the positions cancel against the row count)."""
    batches = list(batches)
    names = sorted({n for g in structures for n, _, _ in consumers(model, g) if f"{n}.weight" in diag})
    if grams is None:
        grams = _grams(model, names, batches, chunk_rows, progress, group)
    samples = int(distributed.all_reduce(torch.tensor([sum(len(x) for x, _ in batches)]), group).item())
    out = {}
    for n in names:
        g = grams.get(n)
        if g is None:
            continue
        raw = g.ss.diagonal()  # sum over rows of x_i^2
        ggn = diag[f"{n}.weight"].double().reshape(diag[f"{n}.weight"].shape[0], -1).cpu()
        # GGN of the mean loss: per sample; raw / samples: per sample summed over its positions
        out[n] = ggn.sum(1) / (raw.sum() / samples).clamp_min(1e-30)
    return out


def obs_saliency(model: nn.Module, structures: StructureSet, batches: Iterable[Batch], *, ridge: float = 1e-4,
                 output_weights: dict[str, torch.Tensor] | None = None, chunk_rows: int = 65536,
                 progress: bool = False, grams: dict[str, InputGram] | None = None,
                 group: distributed.Group = None) -> torch.Tensor:
    """One score per structure (``structures`` order, higher = keep): the summed structured OBS saliency of the
    channel over the group's consumer layers (see the module docstring), float64.

    Args:
        batches: calibration (inputs, targets) batches (targets unused); one forward pass accumulates every
            consumer's input Gram matrix.
        ridge: relative ridge added to each Gram matrix before inversion (``ridge * mean(diag(H))``).
        output_weights: optional per-layer weights of the output rows (e.g. :func:`output_curvature`); with them the
            score is ``1/2 sum_o h_o delta_{o,s}`` (loss units), without them ``sum_o delta_{o,s}``.

    A group with no Conv2d / Linear consumer (its channels feed the model output or other layer types) cannot be
    measured this way: its channels get the largest score of the other groups (kept first); there is none in the
    usual CNNs, where the classifier is the last consumer.
    """
    batches = list(batches)
    if not batches and distributed.world(group) == 1:
        raise ValueError("obs_saliency needs calibration batches: pass at least one (inputs, targets) batch")
    per_group = {g.name: consumers(model, g) for g in structures}
    names = sorted({n for cs in per_group.values() for n, _, _ in cs})
    if grams is None:
        grams = _grams(model, names, batches, chunk_rows, progress, group)
    scores = torch.zeros(structures.num_structures, dtype=torch.float64)
    unmeasured = [g for g in structures if not per_group[g.name]]
    for g in structures:
        base = structures.offsets[g.name]
        total = torch.zeros(g.size, dtype=torch.float64)
        for n, positions, channels in per_group[g.name]:
            m = model.get_submodule(n)
            if n not in grams:
                raise ValueError(f"layer {n!r} never ran on the calibration batches; obs needs its inputs")
            w = m.weight.detach().double().reshape(m.weight.shape[0], -1).cpu()
            cols = _columns(m, positions, channels, g.size)
            rw = None
            if output_weights is not None:
                rw = output_weights.get(n)
                if rw is None:
                    raise ValueError(f"output_weights has no entry for consumer layer {n!r}")
                rw = 0.5 * rw
            total += _block_obs(grams[n].centred(), w, cols, ridge, rw)
        scores[base: base + g.size] = total
    if unmeasured:
        top = float(scores.max())
        for g in unmeasured:
            scores[structures.offsets[g.name]: structures.offsets[g.name] + g.size] = top
    return scores
