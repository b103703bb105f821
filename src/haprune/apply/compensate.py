"""Compensation after removal: refit the layers of a pruned model so they reproduce the dense model's layers.

After channels go, each consumer layer (a conv's or linear's input columns shrank) gets the weights and bias that
best reproduce the dense layer's output on calibration data: a ridge least-squares regression
(:class:`~haprune.apply.regression.RidgeRegression`, float64) of the dense layer's output on the pruned layer's
own input, a conv's input unfolded into its k x k patches with the layer's stride / padding / dilation. All the
pruned layer's input columns are regressors, so no input index mapping is needed; the intercept absorbs the mean
of what the kept columns cannot explain (the removed channels' mean contribution, as FLAP's bias compensation).
Where the layer has no bias and feeds a BatchNorm, the intercept is folded into that BatchNorm's running mean
(``BN(y + b)`` equals ``BN(y)`` with ``running_mean - b``); otherwise a bias is added and reported.

Modes (:data:`COMPENSATE_MODES`):

- ``sequential`` (default): layers refit in forward order on the pruned model's own, already compensated inputs,
  so later layers correct the errors of earlier ones; by default every layer whose input differs from the dense
  layer's is refit, not only the narrowed ones. The calibration inputs run as one batch through both models
  in lockstep (the dense model in a helper thread that stops after each target layer until the pruned model has
  used that layer's output): one forward pass of each model in all, one layer's dense output held at a time.
- ``dense-inputs``: the classical variant (He et al. 2017, ThiNet): each layer fit on the dense model's input
  activations restricted to the input channels the pruned layer kept (``kept_inputs``); no correction of upstream
  errors. One dense forward pass.

A layer whose output channels were pruned too is fit to the dense layer's outputs on the kept output channels
(``kept_outputs``, which :func:`haprune.apply.apply_plan` passes; a standalone caller may pass it or let it be
inferred from the following BatchNorm's statistics or exact weight rows). An
:class:`~haprune.apply.implant.ImplantConv2d` is refit as a whole: its k x k rows on all patch columns, its 1 x 1
implant rows on the centre-tap columns (the implant reproduces the removed channel from the actual pruned input,
and the consumer then uses it as one more regressor).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..estimate.obs import patches
from ..graph import eval_mode, model_device
from .implant import ImplantConv2d
from .regression import RidgeRegression, UndeterminedFitError

__all__ = ["COMPENSATE_MODES", "CompensationResult", "compensate", "CompensationError", "LayerNeed",
           "calibration_requirements", "samples_needed"]

COMPENSATE_MODES = ("sequential", "dense-inputs")


class CompensationError(ValueError):
    """Compensation cannot start: models that do not match, empty or unusable calibration data."""


@dataclass
class CompensationResult:
    """What :func:`compensate` did: which layers, their relative reconstruction errors, time, settings."""

    mode: str
    ridge: float
    layers: list[str] = field(default_factory=list)
    # per layer: relative squared error of the layer output vs the dense layer's output, before / after the refit
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    bn_folded: list[str] = field(default_factory=list)  # layers whose intercept went into the next BatchNorm
    bias_added: list[str] = field(default_factory=list)  # layers that got a bias parameter they did not have
    implants_fit: list[str] = field(default_factory=list)
    # optional refits (input unnarrowed, changed only by upstream layers) that the calibration data could not
    # determine: left as they were, with the reason; a narrowed or implanted layer raises instead
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ layer helpers

def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if type(m) is nn.Conv2d:
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, ImplantConv2d):
        return (m.main is None or _supported(m.main)) and isinstance(m.implant, nn.Conv2d)
    return False


def _geometry(m: nn.Module) -> nn.Module:
    """The module whose conv geometry (kernel, stride, padding, dilation) the layer's input patches follow."""
    if isinstance(m, ImplantConv2d):
        return m.main if m.main is not None else m.implant
    return m


def _in_width(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, ImplantConv2d):
        return _geometry(m).in_channels
    return m.in_channels


def _out_width(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    return m.out_channels


def _kernel(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, ImplantConv2d):
        if m.main is not None:
            return tuple(m.main.kernel_size)
        return (1, 1)
    return tuple(m.kernel_size) if isinstance(m, nn.Conv2d) else (1, 1)


def _rows(m: nn.Module, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """The regressors of layer ``m`` for input ``x``: (rows, columns), float64; a conv's input unfolded into its
    patches (columns ordered channel, kernel row, kernel column, as ``weight.reshape(out, -1)``)."""
    if channels is not None:
        x = x.index_select(1 if not isinstance(m, nn.Linear) else x.dim() - 1, channels.to(x.device))
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
    return patches(x, _geometry(m))


def _targets(m: nn.Module, y: torch.Tensor, outputs: torch.Tensor | None) -> torch.Tensor:
    if outputs is not None:
        y = y.index_select(y.dim() - 1 if isinstance(m, nn.Linear) else 1, outputs.to(y.device))
    if isinstance(m, nn.Linear):
        return y.reshape(-1, y.shape[-1]).to("cpu", torch.float64)
    return y.permute(0, 2, 3, 1).to("cpu", torch.float64).reshape(-1, y.shape[1])


def _centre_columns(m: ImplantConv2d, channels: int) -> torch.Tensor:
    """Patch columns (channel-major, then kernel rows / columns) of the centre tap: what a 1 x 1 conv reads."""
    kh, kw = _kernel(m)
    centre = (kh // 2) * kw + kw // 2
    return torch.arange(channels) * (kh * kw) + centre


def _current(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's current (out, columns) weight and (out,) bias (zeros where it has none), float64."""
    if isinstance(m, ImplantConv2d):
        c = _in_width(m)
        kh, kw = _kernel(m)
        parts_w, parts_b = [], []
        if m.main is not None:
            parts_w.append(m.main.weight.detach().double().reshape(m.main.out_channels, -1))
            parts_b.append(_bias(m.main, m.main.out_channels))
        imp = m.implant
        w = torch.zeros(imp.out_channels, c * kh * kw, dtype=torch.float64)
        w[:, _centre_columns(m, c)] = imp.weight.detach().double().reshape(imp.out_channels, c).cpu()
        parts_w.append(w)
        parts_b.append(_bias(imp, imp.out_channels))
        return torch.cat([p.cpu() for p in parts_w]), torch.cat([p.cpu() for p in parts_b])
    return m.weight.detach().double().reshape(m.weight.shape[0], -1).cpu(), _bias(m, m.weight.shape[0]).cpu()


def _bias(m: nn.Module, n: int) -> torch.Tensor:
    return m.bias.detach().double() if getattr(m, "bias", None) is not None else torch.zeros(n, dtype=torch.float64)


def _fit(name: str, m: nn.Module, reg: RidgeRegression, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the layer's regression: (out, columns) weight and (out,) intercept, float64."""
    try:
        if not isinstance(m, ImplantConv2d):
            return reg.solve(ridge)
        keep = m.main.out_channels if m.main is not None else 0
        w = torch.zeros(reg.m, reg.d, dtype=torch.float64)
        b = torch.zeros(reg.m, dtype=torch.float64)
        if keep:
            wm, bm = reg.solve(ridge)
            w[:keep], b[:keep] = wm[:keep], bm[:keep]
        centre = _centre_columns(m, _in_width(m))
        wi, bi = reg.solve(ridge, columns=centre)
        w[keep:, centre] = wi[keep:]
        b[keep:] = bi[keep:]
        return w, b
    except UndeterminedFitError as e:
        raise UndeterminedFitError(
            f"layer {name!r}: {e} (it has {reg.d} regressors: input channels x kernel taps; calibration rows are "
            f"samples x output positions)") from None


def _relative_error(reg: RidgeRegression, w: torch.Tensor, b: torch.Tensor) -> float:
    total = float((reg.yty + reg.count * reg.y_mean ** 2).sum())  # ||Y||^2 (uncentred)
    return float(reg.residual(w, b).sum()) / max(total, 1e-300)


# ------------------------------------------------------------------------------------------------ writing weights

def _write(name: str, m: nn.Module, w: torch.Tensor, b: torch.Tensor, bn: nn.Module | None,
           result: CompensationResult) -> None:
    """Put the fitted weight into the layer; the intercept into its bias, else the next BatchNorm, else a new bias."""
    with torch.no_grad():
        if isinstance(m, ImplantConv2d):
            keep = m.main.out_channels if m.main is not None else 0
            parts = []
            if m.main is not None:
                m.main.weight.copy_(w[:keep].reshape(m.main.weight.shape).to(m.main.weight))
                parts.append((m.main, slice(0, keep)))
            c = _in_width(m)
            m.implant.weight.copy_(w[keep:, _centre_columns(m, c)].reshape(m.implant.weight.shape)
                                   .to(m.implant.weight))
            parts.append((m.implant, slice(keep, None)))
            result.implants_fit.append(name)
        else:
            m.weight.copy_(w.reshape(m.weight.shape).to(m.weight))
            parts = [(m, slice(0, None))]
        if all(getattr(p, "bias", None) is None for p, _ in parts) and bn is not None:
            rm = bn.running_mean
            rm.sub_(b.to(rm))
            result.bn_folded.append(name)
            return
        for p, sl in parts:
            if getattr(p, "bias", None) is None:
                p.bias = nn.Parameter(torch.zeros(p.weight.shape[0], dtype=p.weight.dtype, device=p.weight.device))
                result.bias_added.append(name)
            p.bias.copy_(b[sl].to(p.bias))


# ------------------------------------------------------------------------------------------------ discovery

def _following_batchnorm(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, nn.Module]:
    """For each layer, the BatchNorm that reads its output tensor directly (if any), seen on one forward pass."""
    outputs: dict[int, str] = {}
    found: dict[str, nn.Module] = {}
    hooks = []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: outputs.__setitem__(id(out), n)))
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            def pre(bn, inp):
                n = outputs.get(id(inp[0]))
                if n is not None and n not in found:
                    found[n] = bn
            hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def _infer_outputs(name: str, dense_m: nn.Module, pruned_m: nn.Module, dense_bn: nn.Module | None,
                   pruned_bn: nn.Module | None) -> torch.Tensor:
    """Which dense output channel each pruned output channel is, when nobody said (exact matches only)."""
    def match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        # rows of a (pruned) that equal rows of b (dense), each used once, in order
        out = []
        for row in a:
            hits = (b == row).all(1).nonzero().flatten().tolist()
            hits = [h for h in hits if h not in out]
            if not hits:
                return None
            out.append(hits[0])
        return torch.as_tensor(out, dtype=torch.long)

    if dense_bn is not None and pruned_bn is not None:
        keys = ("weight", "bias", "running_mean", "running_var")
        a = torch.stack([getattr(pruned_bn, k).detach() for k in keys if getattr(pruned_bn, k, None) is not None], 1)
        b = torch.stack([getattr(dense_bn, k).detach() for k in keys if getattr(dense_bn, k, None) is not None], 1)
        got = match(a.cpu(), b.cpu())
        if got is not None:
            return got
    if not isinstance(pruned_m, ImplantConv2d) and _in_width(pruned_m) == _in_width(dense_m):
        got = match(pruned_m.weight.detach().reshape(pruned_m.weight.shape[0], -1).cpu(),
                    dense_m.weight.detach().reshape(dense_m.weight.shape[0], -1).cpu())
        if got is not None:
            return got
    raise CompensationError(
        f"layer {name!r} has {_out_width(pruned_m)} output channels here but {_out_width(dense_m)} in the dense model, "
        f"and which ones it kept cannot be inferred: pass kept_outputs={{{name!r}: [dense channel of each output]}} "
        f"(haprune.apply.apply_plan does this for you)")


def _stack(calibration: Iterable) -> tuple[torch.Tensor, int]:
    xs = []
    for i, b in enumerate(calibration):
        x = b[0] if isinstance(b, (tuple, list)) else b
        if not isinstance(x, torch.Tensor):
            raise CompensationError(f"calibration batch {i}: inputs must be a tensor (got {type(x).__name__})")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise CompensationError(
                f"calibration batch {i} has inputs of shape {tuple(x.shape)}, batch 0 {tuple(xs[0].shape)}: "
                f"compensation runs them as one batch; pass inputs of one shape (pad sequences to one length)")
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise CompensationError(f"calibration batch {i} holds NaN or infinite inputs; clean the data")
        xs.append(x)
    if not xs or sum(len(x) for x in xs) == 0:
        raise CompensationError("no calibration data: pass at least one (inputs, targets) batch")
    x = torch.cat(xs)
    return x, len(x)


# ------------------------------------------------------------------------------------------------ the dense side

class _DenseStream:
    """Runs the dense model in a helper thread that hands over each target layer's (input, output) in forward
    order and waits until the consumer is done with it: one layer's activations held at a time."""

    def __init__(self, dense: nn.Module, names: list[str], x: torch.Tensor):
        self.items: queue.Queue = queue.Queue(maxsize=1)
        self.go: queue.Queue = queue.Queue()
        self.abort = False
        self.dense, self.names, self.x = dense, names, x
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        wanted = set(self.names)
        hooks = []

        def hook(mod, inp, out, n):
            if self.abort:
                raise _Aborted()
            self.items.put((n, inp[0], out))
            while True:  # wait for the consumer (or an abort)
                try:
                    self.go.get(timeout=0.5)
                    break
                except queue.Empty:
                    if self.abort:
                        raise _Aborted() from None

        try:
            for n in wanted:
                hooks.append(self.dense.get_submodule(n).register_forward_hook(
                    lambda mod, inp, out, n=n: hook(mod, inp, out, n)))
            with torch.no_grad():
                self.dense(self.x)
            self.items.put(("__end__", None, None))
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.items.put(("__error__", e, None))
        finally:
            for h in hooks:
                h.remove()

    def start(self) -> "_DenseStream":
        self.thread.start()
        return self

    def next(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        while True:
            try:
                item = self.items.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the dense model's forward pass stopped early") from None
        if item[0] == "__error__":
            raise item[1]
        return item

    def done(self) -> None:
        self.go.put(1)

    def close(self) -> None:
        self.abort = True
        self.thread.join(timeout=30)


class _Aborted(Exception):
    pass


# ------------------------------------------------------------------------------------------------ entry point

@dataclass(frozen=True)
class LayerNeed:
    """What one layer's least-squares fit needs: ``regressors`` columns (input channels x kernel taps) and one
    intercept, from ``rows_per_sample`` regression rows per calibration sample (a conv's output positions, a
    linear layer's tokens)."""

    rows_per_sample: int
    regressors: int

    def samples(self, regressors: int | None = None) -> int:
        """Calibration samples that determine a fit of ``regressors`` columns (default: all of them)."""
        k = self.regressors if regressors is None else regressors
        return -(-(k + 1) // max(1, self.rows_per_sample))


def calibration_requirements(model: nn.Module, example: Any, layers: Iterable[str] | None = None
                             ) -> dict[str, LayerNeed]:
    """Regression rows per calibration sample and regressors of each layer :func:`compensate` can refit (Conv2d
    with groups 1, Linear; or those named in ``layers``), from one forward pass of ``example`` (a batch of any size;
    the model is not changed). Cheap: meant to check the calibration data's size before expensive work."""
    mods = dict(model.named_modules())
    names = [n for n, m in mods.items() if n and _supported(m) and not _inside_implant(n, mods)]
    if layers is not None:
        wanted = set(layers)
        names = [n for n in names if n in wanted]
    x = example[0] if isinstance(example, (tuple, list)) else example
    batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
    rows: dict[str, int] = {}

    def hook(m, inp, out, n):
        t = out[0] if isinstance(out, (tuple, list)) else out
        per = t.numel() // max(1, _out_width(m))
        rows[n] = max(1, per // max(1, batch))

    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(*example) if isinstance(example, (tuple, list)) else model(example)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        if n in rows:
            kh, kw = _kernel(mods[n])
            out[n] = LayerNeed(rows[n], _in_width(mods[n]) * kh * kw)
    return out


def samples_needed(needs: dict[str, LayerNeed]) -> tuple[int, str | None]:
    """The most calibration samples any layer of ``needs`` requires, and that layer's name (``(0, None)`` if none)."""
    if not needs:
        return 0, None
    name = max(needs, key=lambda n: needs[n].samples())
    return needs[name].samples(), name


def compensate(
    dense: nn.Module,
    pruned: nn.Module,
    calibration: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    mode: str = "sequential",
    ridge: float = 1e-4,
    layers: list[str] | str | None = None,
    kept_inputs: dict[str, list[int]] | None = None,
    kept_outputs: dict[str, list[int]] | None = None,
    chunk_rows: int = 65536,
    progress: bool = False,
    group: Any = None,
) -> CompensationResult:
    """Refit ``pruned``'s layers (in place) so each reproduces the same-named layer of ``dense`` on calibration data.

    Args:
        dense: the original model (never modified: weights, buffers and train/eval flags are as before).
        pruned: its pruned copy (the same module names); modified in place, shapes unchanged (a bias parameter is
            added only to a layer that has none and feeds no BatchNorm, reported in ``bias_added``).
        calibration: (inputs, targets) batches (targets unused); inputs of one shape, run as one batch.
        mode: ``sequential`` or ``dense-inputs`` (see the module docstring).
        ridge: relative ridge: ``ridge * mean(diag(X^T X))`` is added to the Gram matrix's diagonal.
        layers: which Conv2d (groups 1) / Linear layers to refit. Default (None): in ``sequential`` mode every layer
            whose input on the calibration data differs from the dense layer's (narrowed inputs, implanted layers,
            and every layer downstream of a change, so each corrects the errors that reach it: measured on
            ResNet-56 at 70% of parameters removed, L2 plan, 92.8% one-shot against 81.6% when only the narrowed
            layers are refit; ``docs/results/compensation.md``); in ``dense-inputs`` mode the narrowed and
            implanted layers. ``"changed"``: only the narrowed and implanted layers. ``"all"``: every supported
            layer. Or a list of names.
        kept_inputs: layer -> the dense input channel of each of the pruned layer's input channels (needed by
            ``dense-inputs`` for narrowed layers).
        kept_outputs: layer -> the dense output channel of each of the pruned layer's output channels (inferred
            where omitted, from the next BatchNorm's statistics or exact weight rows).
        chunk_rows: regression rows (samples x positions) converted to float64 at a time.
        group: a process group (:mod:`haprune.distributed`): every rank passes the same models and calibration and
            takes its round-robin share of the samples (sample i to rank i % world); each layer's normal equations
            are all-reduced before it is solved, and whether a layer's input differs from the dense one is decided
            over all ranks, so every rank writes the same weights (those of one process on all the samples).

    Raises:
        CompensationError: before any pass, when the models do not match or the calibration data is empty.
        UndeterminedFitError: when a layer's calibration rows cannot determine its fit (names the layer).
    """
    if mode not in COMPENSATE_MODES:
        raise ValueError(f"mode must be one of {COMPENSATE_MODES}, got {mode!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    start = time.perf_counter()
    dmods, pmods = dict(dense.named_modules()), dict(pruned.named_modules())
    supported = [n for n, m in pmods.items() if n and _supported(m) and not _inside_implant(n, pmods)]
    candidates = [n for n in supported if n in dmods]
    missing = [n for n in supported if n not in dmods]  # e.g. modules a surgery added: never refit
    asked = [] if layers is None or layers == "all" else [n for n in layers if n in missing]
    if asked or (missing and not candidates):
        raise CompensationError(f"pruned layers {(asked or missing)[:3]} have no same-named module in the dense "
                                f"model: compensate needs the dense model the pruned one was made from")
    for n in candidates:
        d = dmods[n]
        if not isinstance(d, (nn.Linear, nn.Conv2d)) or isinstance(d, nn.Linear) != isinstance(pmods[n], nn.Linear):
            raise CompensationError(f"layer {n!r} is a {type(pmods[n]).__name__} here but a {type(d).__name__} "
                                    f"in the dense model: were these models made from each other?")
        if isinstance(d, nn.Conv2d) and d.groups != 1:
            raise CompensationError(f"layer {n!r}: grouped convolutions are not compensated")
        if _kernel(pmods[n]) != tuple(getattr(d, "kernel_size", (1, 1))) and not isinstance(pmods[n], ImplantConv2d):
            raise CompensationError(f"layer {n!r}: kernel {_kernel(pmods[n])} here, {d.kernel_size} in the dense model")
    kept_inputs = dict(kept_inputs or {})
    kept_outputs = dict(kept_outputs or {})
    if layers not in (None, "all", "changed") and isinstance(layers, str):
        raise ValueError(f"layers must be None, 'all', 'changed' or a list of layer names, got {layers!r}")
    changed = [n for n in candidates if isinstance(pmods[n], ImplantConv2d)
               or _in_width(pmods[n]) < _in_width(dmods[n])
               or (n in kept_inputs and list(kept_inputs[n]) != list(range(_in_width(dmods[n]))))]
    skip_unchanged = False  # refit only where the input differs from the dense layer's (sequential default)
    if layers == "all":
        chosen = candidates
    elif layers is None and mode == "sequential":
        chosen, skip_unchanged = candidates, True
    elif layers is not None and layers != "changed":
        unknown = [n for n in layers if n not in candidates]
        if unknown:
            raise CompensationError(f"layers {unknown[:3]} are not Conv2d (groups 1) / Linear layers of the pruned "
                                    f"model; choose among e.g. {candidates[:3]}")
        wanted = set(layers)
        chosen = [n for n in candidates if n in wanted]
    else:
        chosen = changed
    fixed = set(changed)
    x, count = _stack(calibration)
    ranks = distributed.world(group)
    if ranks > 1:
        if count < ranks:
            raise CompensationError(f"{count} calibration samples cannot be shared by {ranks} processes: pass more")
        x = x[distributed.rank(group)::ranks]
    result = CompensationResult(mode=mode, ridge=ridge, samples=count)
    if not chosen:
        result.seconds = round(time.perf_counter() - start, 3)
        return result
    for n in chosen:
        if mode == "dense-inputs" and _in_width(pmods[n]) != _in_width(dmods[n]) and n not in kept_inputs:
            raise CompensationError(f"mode 'dense-inputs' needs kept_inputs[{n!r}] (the dense input channel of each "
                                    f"of its {_in_width(pmods[n])} inputs); or use mode 'sequential'")
        if n in kept_inputs and len(kept_inputs[n]) != _in_width(pmods[n]):
            raise CompensationError(f"kept_inputs[{n!r}] has {len(kept_inputs[n])} entries for "
                                    f"{_in_width(pmods[n])} input channels")
    # run order, the BatchNorm after each layer, the kept output channels: one small forward each
    device = model_device(pruned)
    probe = x[:1].to(device)
    with eval_mode(dense, pruned):
        order: list[str] = []
        hooks = [pmods[n].register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in chosen]
        try:
            with torch.no_grad():
                pruned(probe)
        finally:
            for h in hooks:
                h.remove()
        if len(order) != len(set(order)):
            twice = sorted({n for n in order if order.count(n) > 1})
            raise CompensationError(f"layers {twice[:3]} run more than once per forward pass (shared weights); "
                                    f"leave them out with layers=[...]")
        chosen = [n for n in order]
        p_bn = _following_batchnorm(pruned, chosen, probe)
        d_bn = _following_batchnorm(dense, chosen, probe)
    # before any pass: a layer that must be refit and that the calibration data cannot determine fails now
    needs = calibration_requirements(pruned, probe, [n for n in chosen if not skip_unchanged or n in fixed])
    short = {n: need for n, need in needs.items() if count < need.samples()}
    if short:
        most, worst = samples_needed(short)
        raise UndeterminedFitError(
            f"{count} calibration samples cannot determine the refit of {len(short)} layer(s), e.g. {worst!r} "
            f"({short[worst].regressors} regressors, {short[worst].rows_per_sample} row(s) per sample): pass at "
            f"least {most} calibration samples, or prune without compensation")
    outs: dict[str, torch.Tensor | None] = {}
    unknown_outputs: dict[str, CompensationError] = {}
    ins: dict[str, torch.Tensor | None] = {}
    for n in chosen:
        pm, dm = pmods[n], dmods[n]
        if n in kept_outputs:
            idx = torch.as_tensor(kept_outputs[n], dtype=torch.long)
            if len(idx) != _out_width(pm):
                raise CompensationError(f"kept_outputs[{n!r}] has {len(idx)} entries for {_out_width(pm)} outputs")
            outs[n] = None if idx.tolist() == list(range(_out_width(dm))) else idx
        elif _out_width(pm) == _out_width(dm):
            outs[n] = None
        else:
            try:
                outs[n] = _infer_outputs(n, dm, pm, d_bn.get(n), p_bn.get(n))
            except CompensationError as e:
                if not skip_unchanged or n in fixed:
                    raise
                unknown_outputs[n] = e  # raised only if this layer turns out to need a refit
        ins[n] = torch.as_tensor(kept_inputs[n], dtype=torch.long) if n in kept_inputs else None

    def regression(n: str) -> RidgeRegression:
        pm = pmods[n]
        kh, kw = _kernel(pm)
        return RidgeRegression(_in_width(pm) * kh * kw, _out_width(pm), chunk_rows=chunk_rows)

    def accumulate(n: str, reg: RidgeRegression, xin: torch.Tensor, y: torch.Tensor, channels) -> None:
        pm = pmods[n]
        per = max(1, chunk_rows // max(1, _targets(pm, y[:1], outs[n]).shape[0]))
        for s in range(0, len(xin), per):
            reg.add(_rows(pm, xin[s:s + per], channels), _targets(pm, y[s:s + per], outs[n]))

    bar = tqdm(total=len(chosen), desc=f"compensate ({mode})", disable=not progress, leave=False)
    xd = x.to(model_device(dense))
    with eval_mode(dense, pruned):
        stream = _DenseStream(dense, chosen, xd).start()
        try:
            if mode == "dense-inputs":
                for _ in chosen:
                    n, xin, y = stream.next()
                    reg = regression(n)
                    accumulate(n, reg, xin, y, ins[n])
                    stream.done()
                    _solve_and_write(n, pmods[n], reg.all_reduce(group), ridge, p_bn.get(n), result)
                    bar.update(1)
            else:
                def pre(mod, inp, n):
                    name, xd_in, y = stream.next()
                    if name != n:
                        raise RuntimeError(f"layer order differs between the models ({name!r} vs {n!r})")
                    if skip_unchanged and n not in fixed and _same_everywhere(inp[0], xd_in, group):
                        stream.done()  # same input as the dense layer: its kept rows reproduce the dense output
                        bar.update(1)
                        return
                    if n in unknown_outputs:
                        raise unknown_outputs[n]
                    reg = regression(n)
                    accumulate(n, reg, inp[0], y, None)
                    stream.done()
                    try:
                        _solve_and_write(n, pmods[n], reg.all_reduce(group), ridge, p_bn.get(n), result)
                    except UndeterminedFitError as e:
                        if not skip_unchanged or n in fixed:
                            raise
                        result.skipped[n] = str(e)  # an optional refit: the layer keeps its dense weights
                    bar.update(1)

                hooks = [pmods[n].register_forward_pre_hook(lambda m, i, n=n: pre(m, i, n)) for n in chosen]
                try:
                    with torch.no_grad():
                        pruned(x.to(device))
                finally:
                    for h in hooks:
                        h.remove()
        finally:
            stream.close()
            bar.close()
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _solve_and_write(n: str, m: nn.Module, reg: RidgeRegression, ridge: float, bn: nn.Module | None,
                     result: CompensationResult) -> None:
    w0, b0 = _current(m)
    before = _relative_error(reg, w0, b0)
    w, b = _fit(n, m, reg, ridge)
    result.layers.append(n)
    result.error_before[n] = before
    result.error_after[n] = _relative_error(reg, w, b)
    _write(n, m, w, b, bn, result)


def _same_everywhere(a: torch.Tensor, b: torch.Tensor, group: Any) -> bool:
    """``torch.equal(a, b)`` on every rank (each comparing its own shard): one decision for all of them."""
    differs = torch.tensor([0 if torch.equal(a, b) else 1])
    return not bool(distributed.all_reduce_max(differs, group))


def _inside_implant(name: str, modules: dict[str, nn.Module]) -> bool:
    parent = name.rpartition(".")[0]
    return isinstance(modules.get(parent), ImplantConv2d)
