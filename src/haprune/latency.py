"""Latency tables: measured time of each prunable layer at the widths a plan can give it.

Latency does not follow FLOPs. On a CPU a convolution's time is a step function of its channel counts (vector
lanes, blocked kernels), and narrow layers are bound by memory traffic, so a plan that removes many
multiply-adds from layers where they cost little time gives a small speed-up (``docs/results/latency_profile.md``).
A :class:`LatencyTable` holds, for every Conv/Linear layer whose input or output channels belong to a prunable
group, its measured forward time on a grid of (input width, output width), on the machine, batch size and thread
count it will be deployed with. :class:`haprune.plan.CostModel` reads it to predict the latency of any plan, and
``make_plan(..., budget="latency")`` removes the least important channels per millisecond saved until the target
fraction of the (predicted) time is gone.

    table = measure_latency_table(model, structures, torch.randn(64, 1, 28, 28), threads=2)
    table.save("latency.json")                                   # JSON: reuse it for every plan on that machine
    cost = CostModel(model, structures, x, latency=table)
    plan = make_plan(structures, scores, cost, 0.4, budget="latency", round_to=table.step)

What a table predicts is the sum of its layers' times plus ``other_ms``, the rest of the forward pass (BatchNorm,
ReLU, residual additions, pooling, layers outside any group): the dense model's measured time minus its layers'
sum, held fixed whatever the widths (so a target is a fraction of the whole forward pass). Layers with the same
shape share one measurement. Between grid points the time is interpolated linearly, so plans should round widths to the grid
(``round_to=table.step``) to be planned on measured points.
"""
from __future__ import annotations

import bisect
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ._fileio import atomic_write_text
from .graph import StructureSet, channel_widths, eval_mode, forward_with_hooks, run_forward
from .threads import num_threads

__all__ = ["LayerTimes", "LatencyTable", "measure_latency_table", "wall_clock", "layer_widths"]

TABLE_VERSION = 1
_TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerTimes:
    """Forward time (ms) of one layer on a grid: ``ms[i][j]`` at ``in_widths[i]`` inputs, ``out_widths[j]`` outputs."""

    in_widths: list[int]
    out_widths: list[int]
    ms: list[list[float]]

    def __call__(self, cin: float, cout: float) -> float:
        """Time at (``cin``, ``cout``), linear between grid points, clamped to the grid's range."""
        i0, i1, a = _bracket(self.in_widths, cin)
        j0, j1, b = _bracket(self.out_widths, cout)
        m = self.ms
        return ((1 - a) * ((1 - b) * m[i0][j0] + b * m[i0][j1]) + a * ((1 - b) * m[i1][j0] + b * m[i1][j1]))


def _bracket(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around ``x`` and the weight of the upper one."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        n = len(grid) - 1
        return n, n, 0.0
    hi = bisect.bisect_left(grid, x)
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


@dataclass
class LatencyTable:
    """Measured layer times, keyed by fully-qualified module name (see the module docstring)."""

    layers: dict[str, LayerTimes]
    step: int
    meta: dict[str, Any] = field(default_factory=dict)
    other_ms: float = 0.0  # the rest of the forward pass (norms, activations, additions, other layers), held fixed
    version: int = TABLE_VERSION

    def total_ms(self, widths: dict[str, tuple[float, float]]) -> float:
        """``other_ms`` plus the table's layers' times at ``widths[name] = (in, out)``."""
        return self.other_ms + sum(self.layers[n](*widths[n]) for n in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyTable":
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table version {d.get('version')} is not supported (expected {TABLE_VERSION})")
        layers = {k: LayerTimes([int(w) for w in v["in_widths"]], [int(w) for w in v["out_widths"]],
                                [[float(t) for t in row] for row in v["ms"]]) for k, v in d["layers"].items()}
        return cls(layers, int(d["step"]), dict(d.get("meta", {})), float(d.get("other_ms", 0.0)), TABLE_VERSION)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        return cls.from_dict(json.loads(Path(path).read_text()))


def layer_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(input, output) channels of every Conv/Linear layer of ``model``."""
    return {name: channel_widths(m) for name, m in model.named_modules() if isinstance(m, _TIMED)}


def _grid(full: int, step: int, max_points: int) -> list[int]:
    """Widths to measure for a dimension of ``full`` channels: 1, the multiples of ``step`` and ``full`` itself,
    thinned to at most ``max_points`` (evenly, always keeping 1 and ``full``)."""
    ws = sorted({1, full} | set(range(step, full + 1, step)))
    if len(ws) <= max_points:
        return ws
    keep = {ws[round(k * (len(ws) - 1) / (max_points - 1))] for k in range(max_points)}
    return sorted(keep)


def _coupled_dims(model: nn.Module, structures: StructureSet) -> dict[str, tuple[bool, bool]]:
    """Per Conv/Linear module: whether its (input, output) channels shrink with some group."""
    dims: dict[str, list[bool]] = {}
    for g in structures:
        for s in g.slices:
            mod_name, _, leaf = s.tensor.rpartition(".")
            if leaf != "weight":
                continue
            module = model.get_submodule(mod_name)
            if not isinstance(module, _TIMED):
                continue
            d = dims.setdefault(mod_name, [False, False])
            if _depthwise(module):  # in = out
                d[0] = d[1] = True
            else:
                d[1 if s.dim == 0 else 0] = True
    return {k: (v[0], v[1]) for k, v in dims.items()}


def _input_shapes(model: nn.Module, names: Sequence[str], example_inputs: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    forward_with_hooks(model, example_inputs, {model.get_submodule(n): record(n) for n in names})
    return shapes


def _depthwise(module: nn.Module) -> bool:
    """A conv whose every input channel is its own group (in = out channels, one filter each)."""
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _make_layer(module: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh layer like ``module`` with ``cin`` inputs and ``cout`` outputs (random weights: time only)."""
    if isinstance(module, nn.Linear):
        return nn.Linear(cin, cout, bias=module.bias is not None)
    # depthwise stays depthwise; a grouped conv keeps its groups where the widths allow (else their largest divisor)
    groups = cin if _depthwise(module) else math.gcd(math.gcd(cin, cout), module.groups)
    return type(module)(cin, cout, module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, groups=groups, bias=module.bias is not None,
                        padding_mode=module.padding_mode)


Timer = Callable[[nn.Module, torch.Tensor], float]  # (layer, input) -> milliseconds


def wall_clock(repeats: int = 9, warmup: int = 2) -> Timer:
    """The default timer: median wall time (ms) of ``repeats`` calls after ``warmup`` discarded ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    return lambda layer, x: _time_ms(layer, x, repeats, warmup)


def _time_ms(layer: Callable[[Any], Any], x: Any, repeats: int, warmup: int) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            layer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def measure_latency_table(
    model: nn.Module,
    structures: StructureSet,
    example_inputs: Any,
    *,
    step: int = 4,
    max_points: int = 16,
    threads: int | None = None,
    repeats: int = 9,
    warmup: int = 2,
    timer: Timer | None = None,
    progress: bool = False,
) -> LatencyTable:
    """Time every Conv/Linear layer coupled to a group of ``structures`` on a grid of widths, on the CPU.

    ``example_inputs`` sets the batch size and resolution the times hold for: pass what the model will be run on
    (e.g. ``torch.randn(64, 3, 32, 32)``). Each coupled dimension is measured at multiples of ``step`` (and its
    full width, and 1 so that no width falls below the grid), at most ``max_points`` of them; an uncoupled one at its full width only. Layers of equal shape are
    measured once. Each point is the median of ``repeats`` timed calls after ``warmup`` discarded ones, under
    ``torch.set_num_threads(threads)`` when given. Cost: about (points per layer shape) x (repeats + warmup)
    forward calls of one layer; seconds for a ResNet-56 at step 4. With the wall clock, the whole dense model is
    timed too (``repeats`` calls) and what its layers' sum leaves out becomes ``other_ms``. ``timer(layer, input)
    -> ms`` replaces the wall clock (:func:`wall_clock`), e.g. with an analytic cost model or another runtime;
    then ``other_ms`` is 0 (the timer times layers only).
    """
    if step < 1 or max_points < 2:
        raise ValueError(f"need step >= 1 and max_points >= 2; got step={step}, max_points={max_points}")
    timer_name = "wall clock" if timer is None else getattr(timer, "__name__", type(timer).__name__)
    timer = timer or wall_clock(repeats, warmup)
    if any(t.device.type != "cpu" for t in model.parameters()):
        raise ValueError("latency tables are measured on the CPU: pass the model (and inputs) on the CPU, "
                         "e.g. model.cpu()")
    coupled = _coupled_dims(model, structures)
    if not coupled:
        raise ValueError("no Conv/Linear layer of the model is coupled to a prunable group: nothing to time")
    shapes = _input_shapes(model, list(coupled), example_inputs)
    missing = [n for n in coupled if n not in shapes]
    if missing:
        raise ValueError(f"layers {missing[:5]} did not run on the example inputs; pass inputs that reach them")
    cache: dict[tuple, LayerTimes] = {}
    layers: dict[str, LayerTimes] = {}
    started = time.perf_counter()
    names = list(coupled)
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="latency table", unit="layer")
    with num_threads(threads):
        for name in iterator:
            module = model.get_submodule(name)
            cin_full, cout_full = channel_widths(module)
            c_in, c_out = coupled[name]
            shape = shapes[name]
            key = (type(module).__name__, cin_full, cout_full, c_in, c_out, shape,
                   getattr(module, "kernel_size", None), getattr(module, "stride", None),
                   getattr(module, "padding", None), getattr(module, "dilation", None),
                   getattr(module, "groups", 1), module.bias is not None)
            if key not in cache:
                cache[key] = _measure_layer(module, shape, (c_in, c_out), step, max_points, timer)
            layers[name] = cache[key]
        other, model_ms = 0.0, None
        if timer_name == "wall clock":
            with eval_mode(model):
                model_ms = _time_ms(lambda inputs: run_forward(model, inputs), example_inputs, repeats, warmup)
            full = {n: channel_widths(model.get_submodule(n)) for n in layers}
            other = max(0.0, model_ms - sum(layers[n](*full[n]) for n in layers))
    meta = {"model_ms": model_ms, "batch": _batch(example_inputs), "threads": threads if threads is not None else torch.get_num_threads(),
            "timer": timer_name, "repeats": repeats, "warmup": warmup, "max_points": max_points, "distinct_shapes": len(cache),
            "seconds": round(time.perf_counter() - started, 2), "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    return LatencyTable(layers, step, meta, other)


def _measure_layer(module: nn.Module, shape: tuple[int, ...], coupled: tuple[bool, bool], step: int,
                   max_points: int, timer: Timer) -> LayerTimes:
    cin_full, cout_full = channel_widths(module)
    linear = isinstance(module, nn.Linear)

    def time_at(cin: int, cout: int) -> float:
        return float(timer(_make_layer(module, cin, cout).eval(), torch.randn(*_resize(shape, cin, linear))))

    ins = _grid(cin_full, step, max_points) if coupled[0] else [cin_full]
    if not linear and _depthwise(module):  # one width; the time depends on it alone
        return LayerTimes(ins, list(ins), [[time_at(c, c)] * len(ins) for c in ins])
    outs = _grid(cout_full, step, max_points) if coupled[1] else [cout_full]
    return LayerTimes(ins, outs, [[time_at(cin, cout) for cout in outs] for cin in ins])


def _resize(shape: tuple[int, ...], cin: int, linear: bool) -> tuple[int, ...]:
    """The input shape with ``cin`` channels (last dim for Linear, dim 1 for convs)."""
    s = list(shape)
    s[-1 if linear else 1] = cin
    return tuple(s)


def _batch(example_inputs: Any) -> int | None:
    t = example_inputs if isinstance(example_inputs, torch.Tensor) else next(
        (v for v in (example_inputs.values() if isinstance(example_inputs, dict) else example_inputs)
         if isinstance(v, torch.Tensor)), None)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None
