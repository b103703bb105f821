"""The estimate step's data model and shared helpers.

Every criterion turns (model, structures, calibration batches) into one number per structure, higher meaning
"more important, keep". Curvature criteria first produce a per-parameter Hessian (or Fisher) diagonal estimate and
per-structure block traces; a *score rule* then combines curvature and weights:

- ``hap``: Tr(H_s) / n_s * ||w_s||^2, the paper's score (n_s = parameters in the structure).
- ``obd``: 1/2 * sum_{i in s} H_ii * w_i^2, the second-order loss change of zeroing s with a diagonal Hessian
  (exact where the diagonal is exact; Optimal Brain Damage).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..graph import StructureSet, eval_mode, model_device  # noqa: F401  (re-exported)
from ..outputs import OutputFn, logits_of

log = logging.getLogger("haprune.estimate")

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCORE_RULES = ("hap", "obd")


class CalibrationDataError(ValueError):
    """The calibration batches are empty or produce a non-finite loss."""


class ModelCheckError(CalibrationDataError):
    """The model cannot give a usable sensitivity: non-finite weights or buffers, a non-finite output or loss,
    saturated predictions (no curvature), all-zero or non-finite scores, or an operation the chosen estimator
    cannot differentiate. A :class:`CalibrationDataError` so that callers catching that one report it too."""


@dataclass
class Sensitivity:
    """Per-structure importance from one criterion, as a flat vector in ``structures`` order.

    ``trace`` (Tr(H_s)) and ``stderr`` (its standard error) are set by curvature criteria; ``stderr`` only by
    stochastic ones. ``info`` records what was done: probes, samples, seconds, whether the trace is exact.
    """

    criterion: str
    scores: torch.Tensor
    trace: torch.Tensor | None = None
    stderr: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def per_group(self, structures: StructureSet) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in structures.split(self.scores).items()}

    def to_json(self, structures: StructureSet) -> dict[str, Any]:
        """A JSON-ready dict keyed by group (root module fully-qualified name)."""
        groups = {}
        for g in structures:
            sl = slice(structures.offsets[g.name], structures.offsets[g.name] + g.size)
            entry = {"score": self.scores[sl].tolist()}
            if self.trace is not None:
                entry["trace"] = self.trace[sl].tolist()
            if self.stderr is not None:
                entry["stderr"] = self.stderr[sl].tolist()
            groups[g.name] = entry
        return {"criterion": self.criterion, "info": self.info, "groups": groups}


def default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def materialise_batches(batches: Iterable[Batch], device: torch.device, limit: int | None = None) -> list[Batch]:
    """Move calibration batches to ``device`` once and check them."""
    out: list[Batch] = []
    for i, b in enumerate(batches):
        if limit is not None and i >= limit:
            break
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise CalibrationDataError("calibration batches must be (inputs, targets) pairs")
        x, y = b
        if not torch.isfinite(x).all():
            raise CalibrationDataError(f"calibration batch {i} holds NaN or infinite inputs; clean the data")
        out.append((x.to(device), y.to(device)))
    if not out:
        raise CalibrationDataError("no calibration batches: pass at least one (inputs, targets) batch")
    return out


def check_loss(loss: torch.Tensor, batch_index: int) -> None:
    if not torch.isfinite(loss):
        raise CalibrationDataError(
            f"the loss on calibration batch {batch_index} is {loss.item()}; check the model and data "
            "(NaN weights? labels out of range?)"
        )


def forward_logits(model: nn.Module, x: torch.Tensor, output_fn: OutputFn | None = None) -> torch.Tensor:
    """``model(x)`` as a logits tensor (a ``ModelOutput`` / dict / tuple is unwrapped by :func:`logits_of`)."""
    return logits_of(model(x), output_fn)


def _listed(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_parameters(model: nn.Module) -> None:
    """Refuse a model with NaN or infinite parameters or floating buffers, naming the tensors (before any pass)."""
    bad = []
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() or t.is_complex():
                n = int((~torch.isfinite(t.detach())).sum())
                if n:
                    bad.append(f"{kind} {name} ({n} of {t.numel()} values NaN or infinite)")
    if bad:
        raise ModelCheckError(f"the model holds non-finite numbers: {_listed(bad)}; no sensitivity can be "
                              "computed from it: load intact weights (or retrain) before pruning")


def check_first_batch(model: nn.Module, batch: Batch, loss_fn: LossFn | None,
                      output_fn: OutputFn | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass on the first calibration batch, before any estimator's pass: the output must be finite,
    the loss finite and, for the default cross-entropy, the labels in range and the predictions not saturated
    (softmax probabilities all exactly 0 or 1 carry no curvature and no gradient: every score would be zero).
    Returns the logits and {loss, accuracy (cross-entropy only)} of that batch. Call it in eval mode."""
    x, y = batch
    with torch.no_grad():
        logits = forward_logits(model, x, output_fn)
    if not torch.isfinite(logits).all():
        raise ModelCheckError(
            "the model's output on calibration batch 0 holds NaN or infinite values although its weights are "
            "finite: an overflow inside the model (check the input scaling, or run in a wider dtype)")
    stats: dict[str, float] = {}
    if loss_fn is None:
        k = logits.shape[-1]
        if y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8) and len(y) and (
                int(y.min()) < 0 or int(y.max()) >= k):
            raise CalibrationDataError(f"calibration labels run from {int(y.min())} to {int(y.max())}, but the "
                                       f"model outputs {k} classes: labels must lie in 0..{k - 1}")
        with torch.no_grad():
            loss = default_loss(logits, y)
        check_loss(loss, 0)
        p = logits.softmax(-1)
        if not bool(((p * (1 - p)).sum(-1) > 0).any()):
            raise ModelCheckError(
                f"the model's predictions on calibration batch 0 are saturated (loss {loss.item():.4g}; every "
                "softmax probability is exactly 0 or 1): the loss has no gradient and no curvature there, so every "
                "score would be zero. The logits are far too large (largest |logit| "
                f"{logits.abs().max().item():.3g}): check the weights and input scaling")
        stats["loss"] = float(loss)
        if y.dtype == torch.int64 and y.dim() == 1:
            stats["accuracy"] = float((logits.argmax(-1) == y).double().mean())
    else:
        with torch.no_grad():
            loss = loss_fn(logits, y)
        check_loss(loss, 0)
        stats["loss"] = float(loss)
    return logits, stats


def check_scores(scores: torch.Tensor, criterion: str, structures: StructureSet) -> None:
    """After a pass: refuse non-finite scores (naming the groups) and all-zero scores (with the likely cause)."""
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        groups = [g for g, v in structures.split(finite.logical_not()).items() if bool(v.any())]
        raise ModelCheckError(
            f"{criterion} gave NaN or infinite scores for {int((~finite).sum())} of {len(scores)} structures (groups "
            f"{_listed(groups)}): the loss or its derivatives overflowed on some calibration batch; check the data "
            "beyond the first batch, or run in float64")
    if len(scores) and not bool((scores != 0).any()):
        raise ModelCheckError(
            f"{criterion} gave a score of exactly zero to every structure, which ranks nothing: the predictions "
            "are saturated on every calibration sample (probabilities 0 or 1 give no gradient and no curvature), "
            "or the structures' weights are all zero; check the model's weights and the calibration data")


def hf_attention_configs(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The outermost Hugging Face models inside ``model`` (``model`` itself included) whose attention is not
    ``eager``, with their current implementation (``sdpa``, ``flash_attention_2``, ...)."""
    found: list[tuple[nn.Module, str]] = []
    covered: set[int] = set()
    for m in model.modules():
        if id(m) in covered:
            continue
        impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
        if isinstance(impl, str) and callable(getattr(m, "set_attn_implementation", None)):
            covered.update(id(s) for s in m.modules())
            if impl != "eager":
                found.append((m, impl))
    return found


@contextlib.contextmanager
def eager_attention(model: nn.Module, why: str = "double backward") -> Iterator[list[str]]:
    """Switch every Hugging Face model inside ``model`` to eager attention for the block (PyTorch's fused
    attention kernels have no second derivative), restoring each one's implementation afterwards. Yields the
    switches made ("name: sdpa -> eager"); refuses, with the fix, a model that cannot be switched."""
    names = {id(m): n for n, m in model.named_modules()}
    switched: list[tuple[nn.Module, str]] = []
    done: list[str] = []
    try:
        for m, impl in hf_attention_configs(model):
            can = getattr(m, "_can_set_attn_implementation", None)
            if callable(can) and not can():
                raise ModelCheckError(
                    f"{type(m).__name__} uses {impl!r} attention, which has no second derivative ({why}), and cannot "
                    "be switched after loading: load it with attn_implementation='eager', or use criterion "
                    "'fisher' or 'ggn' (first derivatives only)")
            m.set_attn_implementation("eager")
            if m.config._attn_implementation != "eager":
                raise ModelCheckError(
                    f"{type(m).__name__} uses {impl!r} attention, which has no second derivative ({why}), and did "
                    "not switch to eager: load it with attn_implementation='eager', or use criterion 'fisher' or "
                    "'ggn'")
            switched.append((m, impl))
            done.append(f"{names.get(id(m)) or type(m).__name__}: {impl} -> eager")
        if done:
            log.info("switched attention to eager for the %s (restored afterwards): %s", why, "; ".join(done))
        yield done
    finally:
        for m, impl in reversed(switched):
            m.set_attn_implementation(impl)


def double_backward_error(model: nn.Module, batch: Batch, params: list[nn.Parameter], loss_fn: LossFn,
                          output_fn: OutputFn | None = None) -> str | None:
    """A one-sample trial of a Hessian-vector product (what Hutchinson needs): None if it works, else the error.

    Some operations have no second derivative in PyTorch (``hardsigmoid``, fused attention kernels)."""
    x, y = batch
    try:
        with torch.enable_grad():
            loss = loss_fn(forward_logits(model, x[:1], output_fn), y[:1])
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            pairs = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
            if pairs:
                torch.autograd.grad([g for g, _ in pairs], [p for _, p in pairs],
                                    grad_outputs=[torch.ones_like(g) for g, _ in pairs], allow_unused=True)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).strip().splitlines()[0]
    return None


def structure_params(model: nn.Module, structures: StructureSet) -> tuple[list[str], list[nn.Parameter]]:
    named = dict(model.named_parameters())
    names = [n for n in structures.param_names() if n in named]
    missing = [n for n in structures.param_names() if n not in named]
    if missing:
        raise ValueError(f"structures were built for another model: parameters {missing[:3]} are missing")
    return names, [named[n] for n in names]


def weight_sq(model: nn.Module, structures: StructureSet) -> dict[str, torch.Tensor]:
    names, params = structure_params(model, structures)
    return {n: p.detach().double() ** 2 for n, p in zip(names, params)}


def apply_score_rule(rule: str, model: nn.Module, structures: StructureSet, trace: torch.Tensor,
                     diag: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Combine per-structure traces (and the per-element diagonal) with the weights into importance scores."""
    wsq = weight_sq(model, structures)
    if rule == "hap":
        numel = structures.numel().to(trace.device)
        return trace * structures.reduce(wsq).to(trace.device) / numel
    if rule == "obd":
        if diag is None:
            raise ValueError("score rule 'obd' needs a per-element diagonal; this criterion gives none")
        return 0.5 * structures.reduce({n: diag[n].double() * wsq[n].to(diag[n].device) for n in diag})
    raise ValueError(f"unknown score rule {rule!r}; choose one of {', '.join(SCORE_RULES)}")


def relative_stderr(mean: torch.Tensor, m2: torch.Tensor, n: int) -> torch.Tensor:
    """Standard error of a Welford mean, relative to max(|mean|, 1e-3 * mean |mean|)."""
    if n < 2:
        return torch.full_like(mean, math.inf)
    se = (m2 / (n - 1) / n).sqrt()
    floor = 1e-3 * mean.abs().mean().clamp_min(1e-30)
    return se / mean.abs().clamp_min(floor)
