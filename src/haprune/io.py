"""Saving, loading and exporting pruned models, without pickle.

A pruned model is stored as a directory of two plain files:

* ``plan.json``: the :class:`~haprune.plan.Plan` (which channels each group keeps, implants and removes);
* ``model.safetensors``: every parameter and persistent buffer of the pruned (and implanted) model.

Every tensor read back is checked before it reaches a model: the names, the shapes, the kind of number (a float
parameter is never filled from an integer tensor, which would truncate it silently) and, for floating point,
that every value is finite. :func:`save_weights` / :func:`load_checkpoint_weights` do the same for plain
(dense) weight files, single or sharded.

Loading rebuilds the architecture from the plan instead of unpickling code: the caller builds the *dense* model
(same constructor, same arguments; its weights do not matter), :func:`load_pruned` applies the plan to it, which
gives every tensor its pruned shape, then fills in the saved tensors. Nothing in either file can run code.

:func:`export_onnx` writes an ONNX file with a dynamic batch axis, and :func:`onnx_matches` checks it against
PyTorch with onnxruntime.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ._fileio import PathLike, atomic_save_safetensors, atomic_write_bytes, atomic_write_text
from .apply import PlanMismatchError, apply_plan
from .graph import eval_mode
from .plan import Plan

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
_PLAN_HASH_KEY = "haprune.plan_sha256"

__all__ = [
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "OnnxMismatchError",
    "PlanMismatchError",
    "save_pruned",
    "load_pruned",
    "read_weights_metadata",
    "check_state_dict",
    "save_weights",
    "load_checkpoint_weights",
    "export_onnx",
    "onnx_matches",
]


class OnnxMismatchError(ValueError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


# ---------------------------------------------------------------------------------------------------- save / load

def save_pruned(out_dir: str | os.PathLike[str], model: nn.Module, plan: Plan, *,
                extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``out_dir/plan.json`` and ``out_dir/model.safetensors`` (each atomically); return ``out_dir``.

    Args:
        model: the pruned model, as returned by :func:`~haprune.apply.apply_plan` (and fine-tuned, if it was).
        plan: the plan that produced it.
        extra_metadata: stored in the safetensors header (values that are not strings are JSON-encoded).
    The weights file records a hash of the plan, so :func:`load_pruned` notices a plan and weights that do not
    belong together.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", _PLAN_HASH_KEY: _plan_digest(plan)}
    for key, value in (extra_metadata or {}).items():
        if str(key) in metadata:
            raise ValueError(f"extra_metadata key {key!r} is reserved by haprune; rename it")
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    # clones: safetensors refuses tensors that share storage, and views must not drag their base along
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
    atomic_save_safetensors(tensors, out / WEIGHTS_FILE, metadata=metadata)
    atomic_write_text(out / PLAN_FILE, plan.to_json())
    return out


def load_pruned(out_dir: str | os.PathLike[str], base_model: nn.Module, example_inputs: Any, *,
                strict: bool = True) -> nn.Module:
    """Rebuild the model saved by :func:`save_pruned`.

    Args:
        base_model: a freshly built *dense* model of the same architecture (same constructor and arguments);
            its weights are irrelevant and it is not modified.
        example_inputs: a batch the model accepts (for tracing; batch 1 is enough).
        strict: passed to ``load_state_dict``: every tensor of the pruned model must be in the file and vice versa.
    Returns the pruned model (a new module, in ``base_model``'s train/eval mode) holding the saved weights.
    Raises:
        FileNotFoundError: ``plan.json`` or ``model.safetensors`` is missing.
        PlanMismatchError: the plan was made for another architecture than ``base_model``'s.
        ValueError: a file is corrupt, or the saved tensors do not fit the rebuilt model.
    """
    folder = Path(out_dir)
    plan_path, weights_path = folder / PLAN_FILE, folder / WEIGHTS_FILE
    missing = [p.name for p in (plan_path, weights_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {' and '.join(missing)}; save_pruned writes both plan.json and "
                                "model.safetensors into the directory it is given")
    plan = _parse_plan(plan_path.read_text(encoding="utf-8"), plan_path)
    tensors, metadata = _read_safetensors(weights_path)
    saved_hash = metadata.get(_PLAN_HASH_KEY)
    if saved_hash is not None and saved_hash != _plan_digest(plan):
        raise ValueError(f"{weights_path} was saved with another plan than {plan_path}; save both files together "
                         "with save_pruned")
    try:
        model = apply_plan(base_model, plan, example_inputs)
    except PlanMismatchError as e:
        raise PlanMismatchError(f"{plan_path} does not fit base_model: {e}. Build base_model with the same "
                                "architecture and constructor arguments as the model that was pruned") from e
    _check_tensors(model, tensors, weights_path, strict)
    model.load_state_dict(tensors, strict=strict)
    return model


def read_weights_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header metadata of a safetensors file (e.g. ``model.safetensors`` of a run folder), without reading
    the tensors. Raises ValueError naming the file when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e


def _plan_digest(plan: Plan) -> str:
    """SHA-256 of the plan's canonical JSON (insensitive to how plan.json is formatted)."""
    canonical = json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _parse_plan(text: str, path: Path) -> Plan:
    try:
        return Plan.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a valid haprune plan ({type(e).__name__}: {e}); re-save it with "
                         "save_pruned") from e


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the header metadata of a safetensors file."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save the model with "
                         "save_pruned") from e
    return tensors, dict(metadata)


def _check_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, strict: bool) -> None:
    """Raise a readable error when the saved tensors do not fit the rebuilt model (names when ``strict``, shapes,
    number kinds, finite values)."""
    hint = ("Build base_model with the same architecture and constructor arguments (input channels, classes, "
            "width) as the model that was pruned")
    check_state_dict(model, tensors, path, strict=strict, hint=hint, what="the model rebuilt from the plan")


def check_state_dict(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
                     strict: bool = True, hint: str = "", what: str = "the model") -> None:
    """Raise ValueError, naming ``path`` and the first offending tensors, unless ``tensors`` fit ``model``:
    the same names (when ``strict``), the same shapes, floating-point tensors where the model has them (an
    integer tensor would load truncated) and integer ones where it has integers, and only finite values."""
    expected = model.state_dict()
    hint = hint or ("Is it the weights file of this architecture (same model, input channels, classes, width)? "
                    "Pass the weights this model was trained to")
    if strict:
        missing = [n for n in expected if n not in tensors]
        unexpected = [n for n in tensors if n not in expected]
        if missing or unexpected:
            raise ValueError(f"{path} does not match {what}: it lacks "
                             f"{_some(missing)} and has extra {_some(unexpected)}. {hint}, or pass strict=False to "
                             "load only the tensors that match")
    bad = [f"{name}: file {tuple(t.shape)}, model {tuple(expected[name].shape)}"
           for name, t in tensors.items() if name in expected and expected[name].shape != t.shape]
    if bad:
        raise ValueError(f"{path} holds tensors of other shapes than {what}: "
                         f"{_some(bad)}. {hint}")
    kinds = [f"{name}: file {t.dtype}, model {expected[name].dtype}" for name, t in tensors.items()
             if name in expected and t.is_floating_point() != expected[name].is_floating_point()]
    if kinds:
        raise ValueError(f"{path} holds integer tensors where the model has floating-point ones (or the reverse): "
                         f"{_some(kinds)}; loading them would truncate the weights. Re-save the weights in "
                         "floating point (e.g. with haprune.io.save_weights)")
    bad_values = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad_values:
        raise ValueError(f"{path} holds NaN or infinite values in {_some(bad_values)}: the weights are corrupt (or "
                         "the training that produced them diverged); use an earlier checkpoint or retrain")


def _some(items: list[str], limit: int = 5) -> str:
    """``a, b, c (and 2 more)``, or ``nothing``."""
    if not items:
        return "nothing"
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ----------------------------------------------------------------------------------------------------
# Weight files of whole (dense) models: optionally half precision and sharded


def _shard_paths(path: Path) -> List[Path]:
    """Existing shards ``<stem>-00001-of-0000N.safetensors`` of ``path``, checked to be complete."""
    found = sorted(path.parent.glob(f"{path.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{path.suffix}"))
    if not found:
        return []
    count = int(found[0].stem.rsplit("-of-", 1)[1])
    expected = [path.with_name(f"{path.stem}-{i:05d}-of-{count:05d}{path.suffix}") for i in range(1, count + 1)]
    if found != expected:
        raise FileNotFoundError(f"incomplete or mixed shards of {path}: found {[p.name for p in found]}")
    return expected


def _split_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    """Greedy, order-preserving split into groups of at most ``max_bytes`` of tensor data each."""
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"tensor {name} has {nbytes} bytes, more than max_shard_bytes={max_bytes}")
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(
    model: nn.Module,
    path: PathLike,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: Optional[int] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> List[Path]:
    """Save the model's state dict as safetensors at ``path`` (atomically); returns the files written.

    ``dtype`` (e.g. ``torch.float16``) converts floating-point tensors to keep the file small. With
    ``max_shard_bytes``, a state dict that does not fit is split into ``<stem>-00001-of-0000N.safetensors``
    files; :func:`load_checkpoint_weights` reads either form. Stale files of the other form are removed.
    """
    target = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    groups = _split_shards(state, max_shard_bytes) if max_shard_bytes is not None else [state]
    stale = _shard_paths(target) + ([target] if target.exists() else [])
    if len(groups) == 1:
        written = [target]
    else:
        written = [target.with_name(f"{target.stem}-{i:05d}-of-{len(groups):05d}{target.suffix}")
                   for i in range(1, len(groups) + 1)]
    for file, group in zip(written, groups):
        atomic_save_safetensors(group, file, metadata=metadata)
    for old in stale:
        if old not in written:
            old.unlink(missing_ok=True)
    return written


def load_checkpoint_weights(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load weights saved by :func:`save_weights` (single file or shards, any float dtype) into ``model``.

    Tensors are cast to the model's own dtypes and devices. Returns ``model``. Raises ValueError, naming the
    file, when it is not a readable safetensors file or its tensors do not fit ``model``
    (:func:`check_state_dict`: names, shapes, integer vs floating point, NaN / infinite values).
    """
    target = Path(path)
    files = [target] if target.is_file() else _shard_paths(target)
    if not files:
        raise FileNotFoundError(f"no weights at {target} (nor shards {target.stem}-00001-of-N{target.suffix})")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_safetensors(file)[0])
    check_state_dict(model, state, target, strict=strict)
    model.load_state_dict(state, strict=strict)
    return model


# ---------------------------------------------------------------------------------------------------- ONNX

def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike[str], *, opset: int = 17) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path`` atomically, with a dynamic batch axis; return the path.

    ``example_inputs`` is a tensor or a tuple of tensors whose first dimension is the batch. The model's
    train/eval mode is restored afterwards. Works on pruned and implanted models (ImplantConv2d is plain
    conv + concat).
    """
    inputs = _as_tuple(example_inputs)
    with eval_mode(model):
        with torch.no_grad():
            n_out = len(_flatten_outputs(model(*inputs)))
        in_names = _names("input", len(inputs))
        out_names = _names("output", n_out)
        data = _export_bytes(model, inputs, in_names, out_names, opset)
    target = Path(path)
    atomic_write_bytes(target, data)
    return target


def _export_bytes(model: nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str], out_names: list[str],
                  opset: int) -> bytes:
    """Serialised ONNX model.

    Exporter choice: torch >= 2.9 defaults to the torch.export-based ("dynamo") exporter, which in torch 2.13
    cannot emit opset 17 (it exports opset 18 and its down-conversion fails), takes seconds, and prints pages of
    diagnostics. The TorchScript-based exporter (``dynamo=False``) still ships with torch 2.13, runs offline,
    honours the requested opset and handles every op a pruned CNN uses, so it is used whenever it exists; the
    dynamo exporter is the fallback for a torch without it.
    """
    params = inspect.signature(torch.onnx.export).parameters
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in in_names + out_names}
    legacy = {"dynamo": False} if "dynamo" in params else {}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
            torch.onnx.export(model, inputs, buffer, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, **legacy)
        return buffer.getvalue()
    except Exception as e:  # noqa: BLE001 - the TorchScript exporter is gone or cannot export this model
        if "dynamo" not in params:
            raise
        legacy_error = e
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(model, inputs, dynamo=True, input_names=in_names, output_names=out_names,
                                    dynamic_shapes=tuple({0: batch} for _ in inputs), opset_version=opset,
                                    external_data=False)
    except Exception as e:  # noqa: BLE001 - report both exporters' failures together
        raise RuntimeError(f"ONNX export failed with both exporters: TorchScript: {legacy_error}; dynamo: {e}") from e
    return program.model_proto.SerializeToString()


def onnx_matches(model: nn.Module, path: str | os.PathLike[str], inputs: Any, atol: float | None = 1e-5, *,
                 rtol: float = 1e-4) -> float:
    """The largest absolute difference between PyTorch's (eval mode, fp32) and onnxruntime's outputs on ``inputs``.

    Raises :class:`OnnxMismatchError` when the outputs' number or shapes differ, or when some element differs by
    more than ``atol + rtol * |pytorch value|`` (numpy's ``allclose`` rule: large logits carry float32 rounding
    noise of their own size times 1e-7 per op); ``atol=None`` only measures. A CUDA model's reference outputs are
    computed with TF32 off. Needs ``onnxruntime`` (``pip install 'haprune[onnx]'``).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("onnx_matches needs onnxruntime: pip install 'haprune[onnx]'") from e
    args = _as_tuple(inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    got = [torch.from_numpy(g).double() for g in session.run(None, feed)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), _no_tf32(), torch.inference_mode():
        ref = [r.detach().cpu().double() for r in _flatten_outputs(model(*(a.to(device) for a in args)))]
    if len(got) != len(ref):
        raise OnnxMismatchError(f"{path} has {len(got)} outputs, the model {len(ref)}")
    diff, worst = 0.0, 0.0  # largest absolute difference; largest excess over the tolerance
    for i, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            raise OnnxMismatchError(f"output {i}: onnxruntime gives shape {tuple(g.shape)}, PyTorch {tuple(r.shape)}")
        if r.numel():
            err = (r - g).abs()
            diff = max(diff, float(err.max()))
            if atol is not None:
                worst = max(worst, float((err - atol - rtol * r.abs()).max()))
    if atol is not None and (worst > 0 or math.isnan(diff)):
        raise OnnxMismatchError(f"{path} differs from the PyTorch model by up to {diff:.3g} (beyond atol={atol:g}, "
                                f"rtol={rtol:g}); re-export it from this model, or loosen the tolerances for "
                                "reduced-precision models")
    return diff


@contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 convolutions and matrix products on CUDA for the duration of the block."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError("ONNX export and checks take a tensor or a tuple of tensors as inputs, "
                    f"got {type(inputs).__name__}")


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_outputs(o)]
    return []


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]
