"""Compensation and layer-local statistics for transformers: the consumer layers of pruned heads (the attention
output projection) and FFN neurons (the down projection), their input Gram matrices over calibration tokens with
padding excluded, and the refit of those layers after removal.

Rows are tokens, not sequences: a consumer layer sees its input as (batch, tokens, width), and every non-padding
token is one row of the regression. Padding positions are masked out, so neither the Gram matrices (the OBS
saliency) nor the refit (compensation) depend on how much padding a batch carries. The mask comes from the
batch itself: for :class:`~haprune.hf.TextClassifier`'s packed inputs (batch, 2, length) it is ``x[:, 1]``;
other inputs need ``mask_fn(x) -> (batch, length)`` (``None`` from it: every token counts).

:func:`compensate_transformer` is the transformer form of compensation (issue 14): for every consumer whose input
width shrank against the dense model, in forward order, the weights (and bias, where the layer has one) that best
reproduce the dense layer's output on the pruned model's own inputs (ridge least squares in float64, one layer's
Gram matrix held at a time), so later layers correct what earlier ones could not. Implanted heads are regressors
like the kept ones (their output columns are refitted too).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..apply.regression import RidgeRegression, UndeterminedFitError
from ..graph import eval_mode
from .layout import AttentionBlock, find_blocks

__all__ = ["consumer_layers", "packed_token_mask", "token_rows", "collect_regressions", "compensate_transformer",
           "CompensationReport", "MaskFn"]

MaskFn = Callable[[Any], "torch.Tensor | None"]


def packed_token_mask(x: Any) -> torch.Tensor | None:
    """The token mask of a :class:`~haprune.hf.TextClassifier` input (batch, 2, length), else ``None``."""
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == 2 and not x.is_floating_point():
        return x[:, 1] != 0
    return None


def consumer_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(block name, consumer linear name) of every attention (output projection) and FFN (down projection)
    block of ``model``, in forward (module) order."""
    attn, ffn = find_blocks(model)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    pairs = [(b.name, b.o) for b in attn] + [(b.name, b.down) for b in ffn]
    return sorted(pairs, key=lambda p: order[p[1]])


class _Stop(Exception):
    pass


def token_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, tokens, width) -> (rows, width), padding tokens dropped."""
    if t.dim() == 2:
        return t
    if mask is None:
        return t.reshape(-1, t.shape[-1])
    n = t.shape[1]
    m = mask[:, :n].to(device=t.device, dtype=torch.bool)
    if m.shape != t.shape[:2]:
        raise ValueError(f"token mask of shape {tuple(mask.shape)} does not match a layer input of shape "
                         f"{tuple(t.shape)}; pass mask_fn=... that returns the (batch, length) attention mask")
    return t[m]


def _x_of(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _run(model: nn.Module, x: Any, hooks: dict[nn.Module, Any]) -> None:
    """``model(x)`` with the forward hooks registered (always removed); a hook may end the pass early (_Stop)."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_regressions(model: nn.Module, batches: Iterable[Any], layers: list[str], *,
                        targets: nn.Module | None = None, mask_fn: MaskFn | None = None,
                        intercept: dict[str, bool] | None = None, group: Any = None
                        ) -> dict[str, RidgeRegression]:
    """One :class:`RidgeRegression` per layer name: rows = non-padding tokens, X = the layer's input in ``model``,
    Y = the same-named layer's output in ``targets`` (default: ``model`` itself). ``intercept[name]``: centre
    (fit a bias); default: whether the layer has a bias. One forward pass per model and batch; a pass stops
    after the last listed layer. With ``group`` (:mod:`haprune.distributed`) each rank passes its shard of the
    batches and the sums are all-reduced."""
    mask_fn = mask_fn or packed_token_mask
    targets = model if targets is None else targets
    mods = {n: model.get_submodule(n) for n in layers}
    tmods = {n: targets.get_submodule(n) for n in layers}
    regs = {n: RidgeRegression(m.in_features, tmods[n].out_features,
                               intercept=(intercept or {}).get(n, m.bias is not None)) for n, m in mods.items()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    last = max(layers, key=lambda n: order[n])
    xs: dict[str, torch.Tensor] = {}
    ys: dict[str, torch.Tensor] = {}

    def grab(name, x_too, y_too, stop):
        def hook(mod, inp, out):
            if x_too:
                xs[name] = inp[0].detach()
            if y_too:
                ys[name] = out.detach()
            if stop:
                raise _Stop
        return hook

    same = targets is model
    with eval_mode(model), eval_mode(targets):
        for batch in batches:
            x = _x_of(batch)
            mask = mask_fn(x)
            _run(model, x, {m: grab(n, True, same, n == last) for n, m in mods.items()})
            if not same:
                _run(targets, x, {m: grab(n, False, True, n == last) for n, m in tmods.items()})
            for n in layers:
                if n not in xs or n not in ys:
                    raise UndeterminedFitError(f"{n}: no calibration data reached this layer")
                regs[n].add(token_rows(xs[n], mask), token_rows(ys[n], mask))
            xs.clear()
            ys.clear()
    for n in sorted(regs):  # with a process group: every rank's rows (its shard of the batches) together
        regs[n].all_reduce(group)
    return regs


class CompensationReport(dict):
    """Per layer: rows, ridge, residual sum of squares before and after the refit (on the calibration tokens,
    against the dense layer's output), and seconds; a dict, JSON-ready."""


@torch.no_grad()
def compensate_transformer(dense: nn.Module, pruned: nn.Module, batches: Iterable[Any], *, ridge: float = 1e-4,
                           layers: list[str] | None = None, mask_fn: MaskFn | None = None,
                           progress: bool = False) -> CompensationReport:
    """Refit, in place, the output projections and down projections of ``pruned`` whose input shrank against
    ``dense`` (or every one named in ``layers``), in forward order, by ridge least squares of the dense layer's
    output on the pruned layer's own input over the calibration tokens (padding excluded; see the module
    docstring). ``dense`` is never modified. ``batches``: what the models accept, ``(x, y)`` pairs or bare ``x``
    (e.g. :func:`haprune.hf.text_batches` output for a :class:`~haprune.hf.TextClassifier`).

    ``ridge``: relative ridge (times the mean diagonal of the Gram matrix). Raises
    :class:`~haprune.apply.regression.UndeterminedFitError` when the calibration tokens cannot determine a fit
    (fewer non-padding tokens than the layer's input width), before any layer is changed.
    """
    batches = list(batches)
    if not batches:
        raise UndeterminedFitError("no calibration batches: pass batches the model accepts")
    names = [n for _, n in consumer_layers(dense)]
    if layers is None:
        chosen = [n for n in names if pruned.get_submodule(n).in_features != dense.get_submodule(n).in_features]
    else:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"{unknown}: not an output or down projection of the model (choose from {names[:4]}...)")
        chosen = [n for n in names if n in layers]
    for n in chosen:
        mod = pruned.get_submodule(n)
        if not isinstance(mod, nn.Linear) or mod.out_features != dense.get_submodule(n).out_features:
            raise ValueError(f"{n}: the pruned model's layer does not produce the dense layer's output")
    mask_fn = mask_fn or packed_token_mask
    tokens = sum(int(m.sum()) if (m := mask_fn(_x_of(b))) is not None else _x_of(b).shape[0] * _x_of(b).shape[-1]
                 for b in batches)
    for n in chosen:  # fail before any work when a fit is undetermined
        mod = pruned.get_submodule(n)
        need = mod.in_features + (1 if mod.bias is not None else 0)
        if tokens < need:
            raise UndeterminedFitError(f"{n}: {tokens} calibration tokens cannot determine {need} regressors per "
                                       "output; pass more calibration samples")
    report = CompensationReport()
    for n in tqdm(chosen, desc="compensate", disable=None if progress else True, leave=False):
        start = time.perf_counter()
        reg = collect_regressions(pruned, batches, [n], targets=dense, mask_fn=mask_fn)[n]
        mod = pruned.get_submodule(n)
        before = float(reg.residual(mod.weight.detach().cpu(), None if mod.bias is None else mod.bias.detach().cpu())
                       .sum())
        weight, bias = reg.solve(ridge)
        after = float(reg.residual(weight, bias).sum())
        if after > before:  # the ridge term can, in a degenerate layer, cost more than it fits: keep the layer
            report[n] = {"rows": reg.count, "ridge": ridge, "sse_before": before, "sse_after": before,
                         "kept_original": True, "seconds": round(time.perf_counter() - start, 3)}
            continue
        mod.weight.copy_(weight.to(mod.weight))
        if bias is not None:
            mod.bias.copy_(bias.to(mod.bias))
        report[n] = {"rows": reg.count, "ridge": ridge, "sse_before": before, "sse_after": after,
                     "kept_original": False, "seconds": round(time.perf_counter() - start, 3)}
    return report

