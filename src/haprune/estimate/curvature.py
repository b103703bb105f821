"""Curvature criteria: per-structure Hessian block traces and per-element diagonals.

- :func:`hutchinson`: the paper's estimator. Rademacher probes v, Hessian-vector products by double backward
  that reuses each batch's gradient graph across probes, Tr(H_s) ~ mean_v v_s . (Hv)_s, reduced per structure
  in a few vectorised ops. Stops when every structure's estimate has a relative standard error below ``tol``
  or at ``max_probes``.
- :func:`ggn`: the exact Gauss-Newton diagonal from per-sample Jacobians (torch.func), for cross-entropy
  sum_k p_k (J^T (e_k - p))^2 and for mean-squared error. For networks piecewise linear in each parameter
  (ReLU CNNs, eval-mode BatchNorm) the Hessian diagonal *equals* it, so the block traces are exact.
- :func:`fisher`: the Fisher diagonal from per-sample gradients, with labels sampled from the model (an
  unbiased Monte-Carlo estimate of the GGN for cross-entropy) or the true labels (the empirical Fisher).

Distributed (``group``, see :mod:`haprune.distributed`): each rank passes its shard of the calibration batches
with their global positions (``batch_ids``); per-structure sums, sample counts, second moments and the per-batch
stopping statistics are all-reduced (or gathered) before anything is divided by a count, and every batch's random
stream (probes, sampled labels) is seeded by its global position (:func:`batch_generator`), so N ranks give the
single-process result on the same batches up to floating-point summation order.

Memory: per-sample quantities are computed in chunks of at most ``chunk_size`` samples; the peak is about
chunk_size x (outputs for ggn, 1 for fisher) x (structure parameters) floats, plus one batch's activations.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap
from tqdm.auto import tqdm

from .. import distributed
from ..graph import StructureSet
from ..outputs import OutputFn, logits_of
from .base import (
    Batch,
    LossFn,
    check_loss,
    default_loss,
    forward_logits,
    log,
    relative_stderr,
    structure_params,
    weight_sq,
)

# autograd nodes that keep a network piecewise linear in each single parameter (so that diag(H) = diag(GGN))
PIECEWISE_LINEAR_OPS = frozenset({
    "ConvolutionBackward0", "AddmmBackward0", "MmBackward0", "BmmBackward0", "LinearBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
    "ReluBackward0", "LeakyReluBackward0", "LeakyReluBackward1", "ThresholdBackward0", "HardtanhBackward0",
    "MaxPool2DWithIndicesBackward0", "MaxPool1DWithIndicesBackward0", "AvgPool2DBackward0",
    "AdaptiveAvgPool2DBackward0", "AdaptiveMaxPool2DBackward0", "MeanBackward0", "MeanBackward1",
    "SumBackward0", "SumBackward1", "AddBackward0", "SubBackward0", "ViewBackward0", "ReshapeAliasBackward0",
    "UnsafeViewBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "CloneBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward4", "UnsqueezeBackward0", "CatBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "ExpandBackward0", "AccumulateGrad", "ToCopyBackward0", "DivBackward1", "MulBackward1",
    "ConstantPadNdBackward0", "NegBackward0",
})


def nonlinear_ops(model: nn.Module, inputs: torch.Tensor, output_fn: OutputFn | None = None) -> list[str]:
    """Autograd ops of one forward pass that are not on the piecewise-linear whitelist (empty: GGN is exact).

    Parameter-times-parameter products (``MulBackward0``, attention) are reported too: they make the Hessian
    diagonal differ from the GGN diagonal.
    """
    with torch.enable_grad():
        out = forward_logits(model, inputs, output_fn)
    seen, stack, bad = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        if name not in PIECEWISE_LINEAR_OPS:
            bad.add(name)
        stack.extend(f for f, _ in fn.next_functions)
    return sorted(bad)


def _rademacher(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    v = torch.randint(0, 2, p.shape, generator=gen, device="cpu", dtype=torch.int8)
    return (v.to(device=p.device, dtype=p.dtype) * 2 - 1)


STOP_RULES = ("rank", "stderr")


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of calibration batch ``index`` (its position in the whole calibration set): batch 0 uses
    ``seed`` itself, batch i > 0 a seed derived from (seed, i). One stream per batch makes the draws independent
    of how the batches are split among ranks (and of the batches before: a time budget or a stopping rule that
    ends one batch early changes nothing of the next)."""
    if index == 0:
        return torch.Generator().manual_seed(seed)
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 0x5DEECE66D) % (2**63 - 1))


def global_count(n: int, group: distributed.Group = None) -> int:
    """``n`` summed over the ranks of ``group`` (``n`` itself without one)."""
    return int(distributed.all_reduce(torch.tensor([int(n)], dtype=torch.int64), group).item())


def in_batch_order(ids: list[int], group: distributed.Group, *lists: list) -> list[list]:
    """Per-batch lists of every rank (each entry belonging to batch ``ids[j]``), merged in global batch order."""
    if distributed.world(group) == 1:
        return [list(x) for x in lists]
    merged: dict[int, list] = {}
    for part in distributed.all_gather_json([list(ids), [list(x) for x in lists]], group):
        for j, i in enumerate(part[0]):
            merged[i] = [x[j] if j < len(x) else None for x in part[1]]
    order = sorted(merged)
    return [[merged[i][k] for i in order if merged[i][k] is not None] for k in range(len(lists))]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 1.0


def split_half_reliability(even: torch.Tensor, odd: torch.Tensor, factor: torch.Tensor) -> float:
    """Spearman-Brown reliability of a ranking from two independent half estimates (sums of equal counts).

    r = Spearman(factor * even, factor * odd) between the halves; the full estimate's reliability is
    2r / (1 + r): the expected rank correlation between two independent full-length runs.
    """
    r = _spearman(factor * even, factor * odd)
    return 2 * r / (1 + r) if r > -1 else -1.0


def hutchinson(model: nn.Module, structures: StructureSet, batches: list[Batch], *, loss_fn: LossFn = default_loss,
               min_probes: int = 16, max_probes: int = 300, stop: str = "rank", reliability: float = 0.95,
               tol: float = 0.05, check_every: int = 8, seed: int = 0, progress: bool = True,
               time_budget: float | None = None, output_fn: OutputFn | None = None,
               batch_ids: list[int] | None = None, group: distributed.Group = None) -> dict[str, Any]:
    """Hutchinson estimates of each structure's Hessian block trace, averaged over calibration batches.

    For each batch: one backward with ``create_graph=True``; then probes v (Rademacher over the structures'
    parameters; zero elsewhere, which leaves E[v_s . (Hv)_s] = Tr(H_ss) unchanged and lowers the variance)
    until the stopping rule holds (checked every ``check_every`` probes after ``min_probes``) or ``max_probes``
    is reached. The per-element v * Hv average is returned too (a Hutchinson diagonal).

    Stopping rules (``stop``):

    - ``"rank"`` (default): the ranking is stable. The probes are split into two halves (even / odd); the
      Spearman correlation r of the two halves' scores (trace * ||w_s||^2 / n_s, the ``hap`` rule) gives, by the
      Spearman-Brown formula, the reliability 2r / (1 + r) of the full estimate; stop when it reaches
      ``reliability`` at two checks in a row. What pruning needs is the order of the structures, not every trace to a few percent.
    - ``"stderr"``: every structure's relative standard error below ``tol``. Rarely reachable: structures
      with traces near zero need thousands of probes.

    ``time_budget`` (seconds, None: unbounded) bounds the whole run: batch i stops probing (after at least two
    probes) once i+1 equal shares of the budget are spent; ``info["stopped_by"]`` says per batch what ended it
    (``"reliability"``, ``"tol"``, ``"max_probes"`` or ``"time_budget"``), beside the reliability reached.

    Each batch draws its probes from its own stream (:func:`batch_generator` of ``seed`` and its position
    ``batch_ids[i]``, default i) and stops by its own rule, so with ``group`` every rank probes its shard and the
    weighted sums are all-reduced: the single-process result on the union of the shards.
    """
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget}")
    start = time.perf_counter()
    min_probes = max(2, min(min_probes, max_probes))
    check_every = max(2, check_every + check_every % 2)
    names, params = structure_params(model, structures)
    factor = (structures.reduce(weight_sq(model, structures)) / structures.numel()).to(params[0].device)
    reliabilities: list[float] = []
    ids = list(range(len(batches))) if batch_ids is None else list(batch_ids)
    total = global_count(sum(len(y) for _, y in batches), group)
    trace = torch.zeros(structures.num_structures, dtype=torch.float64)
    var = torch.zeros_like(trace)
    diag = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    probes_used: list[int] = []
    stopped_by: list[str] = []
    bar = tqdm(total=len(batches) * max_probes, desc="hutchinson probes", disable=not progress, leave=False)
    for bi, (x, y) in enumerate(batches):
        loss = loss_fn(forward_logits(model, x, output_fn), y)
        check_loss(loss, bi)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        deadline = math.inf if time_budget is None else start + time_budget * (bi + 1) / len(batches)
        why = "max_probes"
        mean = torch.zeros(structures.num_structures, dtype=torch.float64, device=x.device)
        m2 = torch.zeros_like(mean)
        bdiag = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
        n = 0
        halves = [torch.zeros_like(mean), torch.zeros_like(mean)]
        rel = float("nan")
        gen = batch_generator(seed, ids[bi])
        while n < max_probes:
            vs = [_rademacher(p, gen) for p in params]
            hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
            elem = {nm: (v * hv).detach() for nm, v, hv in zip(names, vs, hvs)}
            sample = structures.reduce(elem)
            n += 1
            delta = sample - mean
            mean += delta / n
            m2 += delta * (sample - mean)
            for nm in names:
                bdiag[nm] += (elem[nm].double() - bdiag[nm]) / n
            halves[n % 2] += sample
            bar.update(1)
            if n >= 2 and n % 2 == 0 and n < max_probes and time.perf_counter() > deadline:
                why = "time_budget"
                break
            if n < min_probes or n % check_every:
                continue
            if stop == "rank":  # must hold at two checks in a row: one crossing can be luck
                last, rel = rel, split_half_reliability(halves[0], halves[1], factor)
                if rel >= reliability and last >= reliability:
                    why = "reliability"
                    break
            elif bool((relative_stderr(mean, m2, n) < tol).all()):
                why = "tol"
                break
        bar.update(max_probes - n)
        del grads, loss
        w = len(y) / total
        trace += w * mean.cpu()
        var += w * w * (m2 / max(n - 1, 1) / n).cpu()
        for nm in names:
            diag[nm] += w * bdiag[nm].cpu()
        probes_used.append(n)
        stopped_by.append(why)
        if stop == "rank":
            reliabilities.append(round(split_half_reliability(halves[0], halves[1], factor), 4))
    bar.close()
    distributed.all_reduce_dict({"trace": trace, "var": var, **{"diag/" + k: v for k, v in diag.items()}}, group)
    probes_used, stopped_by, reliabilities = in_batch_order(ids, group, probes_used, stopped_by, reliabilities)
    info = {"probes_per_batch": probes_used, "stop": stop, "max_probes": max_probes, "exact": False,
            "stopped_by": stopped_by, "time_budget": time_budget}
    if "time_budget" in stopped_by:
        log.warning("hutchinson: the time budget of %s s ended probing (probes per batch %s%s)", time_budget,
                    probes_used, f", ranking reliability reached {reliabilities}" if stop == "rank" else "")
    info.update({"reliability_target": reliability, "reliability_per_batch": reliabilities} if stop == "rank"
                else {"tol": tol})
    return {"trace": trace, "stderr": var.sqrt(), "diag": diag, "info": info}


def _split_params(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    wanted = set(names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in wanted}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}
    others.update(dict(model.named_buffers()))
    return params, others


def _auto_chunk(num_params: int, per_sample_copies: int, budget_bytes: float, itemsize: int) -> int:
    return max(1, int(budget_bytes // max(1, num_params * per_sample_copies * itemsize * 3)))


def _squared_grads(model: nn.Module, names: list[str], output_fn: OutputFn | None = None):
    """A function accumulating sum_n w_n * (d CE(x_n, t_n) / d theta)^2 into ``acc``, per sample, chunked.

    ``w`` has shape (batch,), or (parts, batch) to accumulate several weighted sums at once into ``acc`` tensors
    with a leading ``parts`` dimension (the per-sample gradients are computed once)."""
    params, others = _split_params(model, names)

    def sample_loss(p, x, t):
        out = logits_of(functional_call(model, (p, others), (x.unsqueeze(0),)), output_fn)
        return F.cross_entropy(out, t.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    live = dict(model.named_parameters())
    state = {"vmap": True}

    def loop(acc: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> None:
        # per-sample autograd, for models whose forward vmap cannot trace (data-dependent control flow, .item(),
        # as in Hugging Face models); slower per sample but exact and bounded in memory
        plist = [live[n] for n in names]
        for i in range(len(x)):
            loss = F.cross_entropy(forward_logits(model, x[i:i + 1], output_fn), t[i:i + 1])
            wi = w[..., i].double()
            for n, g in zip(names, torch.autograd.grad(loss, plist)):
                acc[n] += wi.reshape(wi.shape + (1,) * g.dim()) * g.double().pow(2)

    def accumulate(acc: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, size: int) -> None:
        if not state["vmap"]:
            return loop(acc, x, t, w)
        for s in range(0, len(x), size):
            try:
                g = per_sample_grad(params, x[s:s + size], t[s:s + size])
            except RuntimeError as e:
                if "vmap" not in str(e) or s > 0:
                    raise
                state["vmap"] = False
                return loop(acc, x, t, w)
            spec = "b,b...->..." if w.dim() == 1 else "kb,b...->k..."
            for n, gn in g.items():  # squares and the chunk's sum in the model's dtype, the running sum in float64
                acc[n] += torch.einsum(spec, w[..., s:s + size].to(gn.dtype), gn.pow(2)).double()

    return params, accumulate


def ggn(model: nn.Module, structures: StructureSet, batches: list[Batch], *, loss: str = "cross_entropy",
        chunk_size: int | None = None, memory_budget_mb: float = 1024, progress: bool = True,
        time_budget: float | None = None, output_fn: OutputFn | None = None,
        group: distributed.Group = None) -> dict[str, Any]:
    """Exact Gauss-Newton diagonal (and block traces) of the mean loss over the calibration batches.

    Cross-entropy: diag(GGN) = mean_n sum_k p_nk * (grad log p_k(x_n))^2 (the Fisher identity: J^T (diag p -
    p p^T) J = sum_k p_k (J^T (e_k - p))(J^T (e_k - p))^T), computed with one per-sample gradient pass per class.
    Mean-squared error (``loss="mse"``, mean over the K outputs): diag(GGN) = mean_n 2/K * sum_k (J_nk)^2 from
    per-sample Jacobians. Per-sample work runs in chunks that keep it under ``memory_budget_mb``.
    With ``time_budget`` (seconds), batches after the one that spends it are skipped (at least one batch is used;
    the result is the mean over the batches used, ``info["batches_used"]``). With ``group``, each rank passes
    its shard of the batches; the sums and counts are all-reduced.
    """
    start = time.perf_counter()
    names, plist = structure_params(model, structures)
    num = sum(p.numel() for p in plist)
    total = sum(len(y) for _, y in batches)
    diag = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, plist)}
    if loss == "cross_entropy":
        params, accumulate = _squared_grads(model, names, output_fn)
    elif loss == "mse":
        params, others = _split_params(model, names)
        jac = vmap(jacrev(lambda p, x: logits_of(functional_call(model, (p, others), (x.unsqueeze(0),)),
                                                 output_fn).squeeze(0)), in_dims=(None, 0))
    else:
        raise ValueError(f"ggn supports loss 'cross_entropy' or 'mse', not {loss!r}")
    bar = tqdm(total=total, desc="ggn samples", disable=not progress, leave=False)
    used = 0
    for bi, (x, y) in enumerate(batches):
        if bi and time_budget is not None and time.perf_counter() - start > time_budget:
            break
        with torch.no_grad():
            logits = forward_logits(model, x, output_fn)
        k = logits.shape[-1]
        if loss == "cross_entropy":
            size = chunk_size or _auto_chunk(num, 1, memory_budget_mb * 2**20, plist[0].element_size())
            p = logits.softmax(-1)
            for c in range(k):
                accumulate(diag, x, torch.full_like(y, c), p[:, c], size)
        else:
            size = chunk_size or _auto_chunk(num, k, memory_budget_mb * 2**20, plist[0].element_size())
            for s in range(0, len(x), size):
                for n, Jn in jac(params, x[s:s + size]).items():
                    diag[n] += (2.0 / k) * Jn.double().pow(2).sum((0, 1))
        bar.update(len(x))
        used += len(x)
    bar.close()
    distributed.all_reduce_dict(diag, group)
    counts = distributed.all_reduce(torch.tensor([used, bi_used(batches, used), len(batches)]), group).tolist()
    used = counts[0]
    diag = {n: (d / used).cpu() for n, d in diag.items()}
    return {"trace": structures.reduce(diag), "stderr": None, "diag": diag,
            "info": _budget_info({"samples": used, "loss": loss}, "ggn", counts[1], counts[2], time_budget)}


def importance_draws(probs: torch.Tensor, draws: int, generator: torch.Generator, parts: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (input n, label k) and weights for the importance-sampled Fisher of one batch.

    The GGN diagonal of cross-entropy is sum_n sum_k p_nk g_nk^2 with g_nk = J_n^T (p_n - e_k) (the gradient of
    -log p_k(x_n)). Drawing pairs from p_nk alone (the plain sampled Fisher) wastes most draws: on a trained net
    the predicted class has p ~ 1 but a tiny gradient, and a few uncertain inputs carry most of the curvature.
    Here pairs are drawn from pi_nk proportional to p_nk * ||p_n - e_k||^2, the same quantity measured at the
    logits (the output-space GGN trace of each pair): inputs by systematic sampling on their total mass, then a label
    per drawn input from its own pairs. Each distinct pair gets weight count * p_nk / (draws * pi_nk), so that
    sum over pairs of weight * g_nk^2 is an unbiased estimate of sum_n sum_k p_nk g_nk^2.

    With ``parts`` > 1 the draws are ``parts`` independent systematic samples (each with its own offset, sizes
    summing to ``draws``), each weighted to estimate the total on its own, then averaged: the spread of those
    independent estimates gives an honest standard error (one sample cut into interleaved groups would not: its
    groups share one offset and the error comes out about twice too large).

    Returns (inputs, labels, weights) over the distinct pairs drawn; weights has shape (parts, pairs), part j's
    row being its estimate's weights divided by ``parts``, so that the rows sum to the weights of the average.
    """
    probs = probs.double().cpu()
    n, k = probs.shape
    eye = torch.eye(k, dtype=probs.dtype)
    logit_sq = ((probs[:, None, :] - eye[None]) ** 2).sum(-1)          # ||p_n - e_k||^2, shape (n, k)
    mass = (probs * logit_sq).flatten()
    total = mass.sum()
    if not total > 0:  # every input predicted with certainty: no curvature anywhere
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(parts, 0, dtype=torch.float64)
    pi = mass / total
    # two stages: inputs by systematic sampling over their total mass (in each of the ``parts`` independent samples,
    # evenly spaced points on the cumulative sum from one uniform offset: an input of mass m gets floor or ceil of
    # size * m points, so with equal masses every input gets its share), then each drawn input's label
    # independently from its own share
    per_input = pi.view(n, k).sum(1)
    cdf = per_input.cumsum(0)
    cdf[-1] = 1.0
    sizes = [draws // parts + (1 if j < draws % parts else 0) for j in range(parts)]
    points = torch.cat([(torch.rand((), generator=generator, dtype=torch.float64)
                         + torch.arange(m, dtype=torch.float64)) / m for m in sizes])
    part = torch.repeat_interleave(torch.arange(parts), torch.tensor(sizes))
    scale = 1.0 / (parts * torch.tensor(sizes, dtype=torch.float64))[part]  # the mean of the parts' estimates
    rows = torch.searchsorted(cdf, points).clamp_max(n - 1)
    ok = per_input[rows] > 0  # float round-off could land a point on an input of zero mass
    rows, part, scale = rows[ok], part[ok], scale[ok]
    labels = torch.multinomial(pi.view(n, k)[rows], 1, generator=generator).squeeze(1)
    pairs, where = torch.unique(rows * k + labels, return_inverse=True)
    weights = torch.zeros(parts, len(pairs), dtype=torch.float64)
    weights.index_put_((part, where), scale, accumulate=True)
    weights *= probs.flatten()[pairs] / pi[pairs]
    return pairs // k, pairs % k, weights


def fisher(model: nn.Module, structures: StructureSet, batches: list[Batch], *, labels: str = "sampled",
           sampling: str = "importance", samples_per_input: float = 1.0, stderr_groups: int = 8, seed: int = 0,
           chunk_size: int | None = None, memory_budget_mb: float = 1024, progress: bool = True,
           time_budget: float | None = None, output_fn: OutputFn | None = None,
           batch_ids: list[int] | None = None, group: distributed.Group = None) -> dict[str, Any]:
    """Fisher diagonal from per-sample squared gradients of the cross-entropy (correctly per sample).

    ``labels="sampled"``: an unbiased Monte-Carlo estimate of the GGN diagonal (the true Fisher) from about
    ``samples_per_input`` x (batch size) per-sample gradients per batch (a fraction below 1 is allowed), drawn by
    ``sampling``:

    - ``"importance"`` (default): (input, label) pairs from p_nk * ||p_n - e_k||^2 with systematic sampling
      (:func:`importance_draws`); the cost is the distinct pairs drawn, at most the draws. Its standard error
      comes from ``stderr_groups`` interleaved sub-samples (random groups; fewer where memory or draws are short).
    - ``"multinomial"``: for every input, ``samples_per_input`` labels y ~ softmax(logits) (an integer >= 1);
      no standard error.

    ``labels="true"``: the data's labels (the empirical Fisher), one gradient per input.

    With ``time_budget`` (seconds), batches after the one that spends it are skipped (at least one is used).
    Labels are drawn from one stream per batch (:func:`batch_generator` of ``seed`` and the batch's position
    ``batch_ids[i]``); with ``group`` each rank passes its shard and the sums and counts are all-reduced.
    """
    start = time.perf_counter()
    if labels not in ("sampled", "true"):
        raise ValueError(f"labels must be 'sampled' or 'true', not {labels!r}")
    if sampling not in ("importance", "multinomial"):
        raise ValueError(f"sampling must be 'importance' or 'multinomial', not {sampling!r}")
    if not samples_per_input > 0:
        raise ValueError(f"samples_per_input must be > 0, not {samples_per_input}")
    multinomial = labels == "sampled" and sampling == "multinomial"
    if multinomial and samples_per_input != int(samples_per_input):
        raise ValueError("sampling='multinomial' draws a whole number of labels per input; "
                         "use sampling='importance' for a fraction")
    names, plist = structure_params(model, structures)
    num = sum(p.numel() for p in plist)
    _, accumulate = _squared_grads(model, names, output_fn)
    ids = list(range(len(batches))) if batch_ids is None else list(batch_ids)
    importance = labels == "sampled" and not multinomial
    draws_per_batch = [max(1, round(samples_per_input * len(y))) for _, y in batches]
    fewest = int(distributed.all_reduce_min(torch.tensor([min(draws_per_batch, default=2**31)]), group).item())
    # importance sampling keeps ``parts`` interleaved sub-sums (random groups) for a standard error, as many as a
    # quarter of the memory budget holds (at most stderr_groups, at most the draws of the smallest batch)
    parts = 1
    if importance:
        parts = int(min(stderr_groups, fewest, memory_budget_mb * 2**20 / 4 // (8 * num)))
        parts = parts if parts >= 2 else 1
    acc = {n: torch.zeros((parts, *p.shape), dtype=torch.float64, device=p.device) for n, p in zip(names, plist)}
    size = chunk_size or _auto_chunk(num, 1, memory_budget_mb * 2**20, plist[0].element_size())
    inputs = 0
    gradients = 0
    bar = tqdm(total=sum(len(y) for _, y in batches), desc="fisher inputs", disable=not progress, leave=False)
    for bi, (x, y) in enumerate(batches):
        if bi and time_budget is not None and time.perf_counter() - start > time_budget:
            break
        inputs += len(x)
        gen = batch_generator(seed, ids[bi])
        with torch.no_grad():
            logits = forward_logits(model, x, output_fn)
        check_loss(F.cross_entropy(logits, y), ids[bi])
        ones = torch.ones(1, len(x), device=x.device)
        if labels == "true":
            accumulate(acc, x, y, ones, size)
            gradients += len(x)
        elif multinomial:
            probs = logits.softmax(-1).double().cpu()
            for _ in range(int(samples_per_input)):
                t = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(x.device)
                accumulate(acc, x, t, ones / samples_per_input, size)
                gradients += len(x)
        else:
            rows, t, w = importance_draws(logits.softmax(-1), draws_per_batch[bi], gen, parts)
            if len(rows):
                rows = rows.to(x.device)
                accumulate(acc, x[rows], t.to(x.device), w.to(device=x.device, dtype=logits.dtype), size)
            gradients += len(rows)
        bar.update(len(x))
    bar.close()
    distributed.all_reduce_dict(acc, group)
    counts = distributed.all_reduce(
        torch.tensor([inputs, gradients, bi_used(batches, inputs), len(batches)]), group).tolist()
    inputs, gradients = counts[0], counts[1]
    diag = {n: (a.sum(0) / inputs).cpu() for n, a in acc.items()}
    stderr = None
    if parts > 1:  # part k alone estimates the total as parts * (its sum): the spread of those gives the error
        per_part = torch.stack([structures.reduce({n: parts * a[k].cpu() / inputs for n, a in acc.items()})
                                for k in range(parts)])
        stderr = per_part.std(0) / parts ** 0.5
    info = {"labels": labels, "samples": inputs, "gradients": gradients, "exact": False}
    if labels == "sampled":
        info.update({"sampling": sampling, "samples_per_input": samples_per_input})
    if stderr is not None:
        info["stderr_groups"] = parts
    info = _budget_info(info, "fisher", counts[2], counts[3], time_budget)
    return {"trace": structures.reduce(diag), "stderr": stderr, "diag": diag, "info": info}


def bi_used(batches: list[Batch], samples: int) -> int:
    """How many leading batches hold ``samples`` samples."""
    seen = 0
    for i, (_, y) in enumerate(batches):
        if seen >= samples:
            return i
        seen += len(y)
    return len(batches)


def _budget_info(info: dict[str, Any], name: str, used: int, batches: int,
                 time_budget: float | None) -> dict[str, Any]:
    info["time_budget"] = time_budget
    if used < batches:
        info["batches_used"] = used
        log.warning("%s: the time budget of %s s was spent after %d of %d calibration batches; the estimate uses "
                    "those", name, time_budget, used, batches)
    return info
