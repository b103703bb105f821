"""Structures: what can be pruned, and which tensors each prunable channel couples together.

Torch-Pruning's dependency graph (DepGraph) finds the coupled channels: a conv's output channel, its BatchNorm
channel, the input column of every consumer, and every channel tied to it through a residual addition or a
concatenation. haprune calls one such set of coupled channels a *group*, named by its root module's
fully-qualified name, and one channel index of a group a *structure*. For each group it records, per tensor,
which slice belongs to which channel (a :class:`TensorSlice`), so that any per-element quantity (a Hessian
diagonal, a weight magnitude) reduces to per-structure values in a few vectorised ops.

Groups that cannot be pruned safely are *refused* with a reason and never touched: groups holding a layer whose
parameters haprune does not know how to slice, groups that contain an ignored layer (by default the classifier),
and groups whose trial surgery breaks the forward pass or changes the output shape (a residual tied to the model
input, a channel count baked into forward code).
"""
from __future__ import annotations

import copy
import itertools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.pruner import function as tpf

__all__ = [
    "TensorSlice",
    "Group",
    "StructureSet",
    "build_structures",
    "NothingPrunableError",
    "UnsupportedLayerError",
    "default_ignored_layers",
]


class NothingPrunableError(ValueError):
    """The model has no group of channels that haprune can prune."""


class UnsupportedLayerError(ValueError):
    """A group couples a layer whose tensors haprune cannot slice."""


@dataclass(frozen=True)
class TensorSlice:
    """The part of one tensor (parameter or buffer) coupled to a group's channels.

    Position ``idxs[j]`` along ``dim`` belongs to the group's channel ``root_idxs[j]``.
    """

    tensor: str  # fully-qualified name, e.g. "layer1.0.conv1.weight"
    dim: int
    idxs: torch.Tensor  # int64, positions along ``dim``
    root_idxs: torch.Tensor  # int64, the group channel of each position
    is_param: bool  # False for buffers (BatchNorm running statistics): moved by surgery, never scored

    @property
    def multiplicity(self) -> int:
        """Positions per channel (1, or H*W where a flatten feeds a linear layer)."""
        return max(1, len(self.idxs) // max(1, len(torch.unique(self.root_idxs))))


@dataclass
class Group:
    """A set of coupled channels, named by its root module (whose output channels they are)."""

    name: str
    size: int  # number of channels (structures) in the group
    slices: list[TensorSlice]
    out_modules: list[str]  # modules whose *output* channels are in the group (conv, linear, BN, ...)
    in_modules: list[str]  # modules whose *input* channels are in the group
    implantable: list[str] = field(default_factory=list)  # k x k Conv2d among out_modules that can take an implant

    @property
    def param_slices(self) -> list[TensorSlice]:
        return [s for s in self.slices if s.is_param]


# module type -> (tensors sliced when its output channels are pruned, when its input channels are pruned)
_CONV_TENSORS = ({"weight": 0, "bias": 0}, {"weight": 1})
_CONVT_TENSORS = ({"weight": 1, "bias": 0}, {"weight": 0})
_LINEAR_TENSORS = ({"weight": 0, "bias": 0}, {"weight": 1})
_NORM_TENSORS = ({"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}, {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0})


def _tensor_dims(module: nn.Module, out: bool) -> dict[str, int]:
    """Which of ``module``'s tensors are sliced, along which dim, when its out (or in) channels are pruned."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.out_channels == module.in_channels and module.groups > 1
        if module.groups > 1 and not depthwise:
            raise UnsupportedLayerError(
                f"grouped convolution with groups={module.groups} (not depthwise); add it to ignored_layers"
            )
        if depthwise:  # in and out channels are the same channel: both slice dim 0
            return {"weight": 0, "bias": 0}
        table = _CONVT_TENSORS if module.transposed else _CONV_TENSORS
        return table[0 if out else 1]
    if isinstance(module, nn.Linear):
        return _LINEAR_TENSORS[0 if out else 1]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _NORM_TENSORS[0]
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise UnsupportedLayerError("LayerNorm over more than one dimension; add it to ignored_layers")
        return {"weight": 0, "bias": 0}
    if isinstance(module, nn.PReLU):
        return {"weight": 0} if module.num_parameters > 1 else {}
    if not any(True for _ in module.parameters(recurse=False)) and not any(True for _ in module.buffers(recurse=False)):
        return {}
    raise UnsupportedLayerError(
        f"layer of type {type(module).__name__} has tensors haprune cannot slice; "
        "add it to ignored_layers (its group will be kept whole)"
    )


def default_ignored_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """The classifier: the last Conv/Linear executed in the forward pass (its outputs are the model's outputs)."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=name: order.append(n))
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            _forward(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:] if order else []


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward_with_hooks(model: nn.Module, inputs: Any, hooks: dict[nn.Module, Callable]) -> None:
    """Run ``model`` once on ``inputs`` (eval mode, no gradients) with each forward hook registered on its module;
    the hooks are removed afterwards, whatever happens. Hooks must return None (the output stays as it is)."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()


def channel_widths(module: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a Conv or (features of a) Linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _output_shapes(o)]
    return []


class StructureSet:
    """The prunable groups of a model, with vectorised per-structure reductions.

    Build it with :func:`build_structures`. It keeps the dependency graph of the model it was built on; surgery
    (``haprune.apply``) works on a copy and rebuilds the graph there.
    """

    def __init__(self, groups: list[Group], refused: list[tuple[str, str]], ignored: list[str],
                 param_shapes: dict[str, tuple[int, ...]]):
        self.groups = groups
        self.refused = refused
        self.ignored = ignored
        self.param_shapes = param_shapes
        self._by_name = {g.name: g for g in groups}
        offsets, o = {}, 0
        for g in groups:
            offsets[g.name] = o
            o += g.size
        self.offsets = offsets
        self.num_structures = o

    def __getitem__(self, name: str) -> Group:
        return self._by_name[name]

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def param_names(self) -> list[str]:
        """Parameters that belong to at least one structure."""
        seen: dict[str, None] = {}
        for g in self.groups:
            for s in g.param_slices:
                seen.setdefault(s.tensor, None)
        return list(seen)

    def reduce(self, per_element: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum a per-element quantity over each structure's parameters.

        ``per_element`` maps parameter names to tensors of the parameter's shape (missing names count as zero).
        Returns a flat float64 vector of length :attr:`num_structures`, groups in order (see :meth:`split`).
        Vectorised: a few tensor ops per (group, tensor) pair, none per channel.
        """
        device = next(iter(per_element.values())).device if per_element else torch.device("cpu")
        out = torch.zeros(self.num_structures, dtype=torch.float64, device=device)
        for g in self.groups:
            base = self.offsets[g.name]
            for s in g.param_slices:
                t = per_element.get(s.tensor)
                if t is None:
                    continue
                idxs, roots = s.idxs.to(t.device), s.root_idxs.to(t.device)
                vals = t.movedim(s.dim, 0).index_select(0, idxs).reshape(len(idxs), -1).sum(1)
                out.index_add_(0, roots + base, vals.to(torch.float64))
        return out

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat per-structure vector into one vector per group."""
        return {g.name: flat[self.offsets[g.name]: self.offsets[g.name] + g.size] for g in self.groups}

    def numel(self) -> torch.Tensor:
        """n_s: parameters in each structure."""
        ones = {n: torch.ones(shape) for n, shape in self.param_shapes.items()}
        return self.reduce(ones)

    def describe(self) -> str:
        lines = [f"{len(self.groups)} prunable groups, {self.num_structures} structures"]
        for g in self.groups:
            lines.append(f"  {g.name}: {g.size} channels, couples {', '.join(g.out_modules + g.in_modules)}")
        for name, why in self.refused:
            lines.append(f"  refused {name}: {why}")
        return "\n".join(lines)


def _module_names(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"ignored layer(s) {missing} not found in the model; names are fully-qualified, "
                         f"e.g. {next(iter(n for n in modules if n), '')!r}")
    return [modules[n] for n in names]


@contextmanager
def preserved_modes(*models: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit.

    A mixed state (a model training with frozen BatchNorm layers, say) survives, which
    ``model.train(was_training)`` would overwrite.
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with ``models`` in eval mode (BatchNorm uses running statistics, as in the paper);
    every submodule's own flag comes back afterwards (:func:`preserved_modes`)."""
    with preserved_modes(*models):
        for model in models:
            model.eval()
        yield


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Trace ``model`` with Torch-Pruning (in eval mode, so BatchNorm statistics are not touched)."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def _group_from_tp(dg: tp.DependencyGraph, tp_group, name: str, size: int) -> Group:
    mod2name = dg._module2name
    slices: dict[tuple[str, int], TensorSlice] = {}
    out_modules: list[str] = []
    in_modules: list[str] = []
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, nn.Module) or module not in mod2name:
            if isinstance(module, nn.Parameter):
                raise UnsupportedLayerError("a bare nn.Parameter used in forward code is coupled to this group")
            continue  # an op without tensors (add, cat, flatten, ...)
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        mname = mod2name[module]
        dims = _tensor_dims(module, is_out)
        if not dims:
            continue
        (out_modules if is_out else in_modules).append(mname)
        roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
        pos = torch.as_tensor(idxs, dtype=torch.long)
        for tname, dim in dims.items():
            t = getattr(module, tname, None)
            if t is None:
                continue
            full = f"{mname}.{tname}" if mname else tname
            key = (full, dim)
            if key in slices:  # same tensor reached twice (depthwise in/out): keep one
                continue
            slices[key] = TensorSlice(full, dim, pos, roots, isinstance(t, nn.Parameter))
    # an implant replaces whole output rows: the conv's dim 0 must map one-to-one onto all the group's channels
    full_rows = {s.tensor.rpartition(".")[0] for s in slices.values()
                 if s.tensor.endswith(".weight") and s.dim == 0 and len(s.idxs) == size}
    implantable = [m for m in out_modules if m in full_rows and _is_implantable(dg.model.get_submodule(m))]
    return Group(name, size, list(slices.values()), _dedup(out_modules), _dedup(in_modules), _dedup(implantable))


def _dedup(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _is_implantable(m: nn.Module) -> bool:
    """A plain k x k Conv2d (k > 1, odd, 'same'-centred padding, no dilation, no groups) can take an implant."""
    return (
        type(m) is nn.Conv2d
        and m.groups == 1
        and m.kernel_size[0] > 1
        and m.kernel_size[0] == m.kernel_size[1]
        and m.kernel_size[0] % 2 == 1
        and m.dilation == (1, 1)
        and m.padding == (m.kernel_size[0] // 2,) * 2
        and m.padding_mode == "zeros"
    )


def build_structures(
    model: nn.Module,
    example_inputs: Any,
    ignored_layers: Sequence[str] | None = None,
    root_types: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear),
    check_surgery: bool = True,
) -> StructureSet:
    """Find the prunable groups of ``model``.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor (or tuple / dict of them) the model accepts, for tracing; a batch of 1 is enough.
        ignored_layers: fully-qualified names of modules whose output channels must not change. ``None``: the
            classifier (the last Conv/Linear in the forward pass). Pass ``[]`` to ignore nothing.
        root_types: module types whose output channels start a group.
        check_surgery: try removing one channel of every group on a copy and refuse the groups whose removal
            breaks the forward pass or changes the output shape.

    Raises:
        NothingPrunableError: when no group is left.
    """
    if ignored_layers is None:
        ignored_layers = default_ignored_layers(model, example_inputs)
    ignored_mods = _module_names(model, ignored_layers)
    dg = build_dependency_graph(model, example_inputs)
    groups: list[Group] = []
    refused: list[tuple[str, str]] = []
    mod2name = dg._module2name
    # get_all_groups skips groups that contain an ignored layer's output channels
    seen_roots: set[str] = set()
    for tp_group in dg.get_all_groups(ignored_layers=list(ignored_mods), root_module_types=root_types):
        root = tp_group[0].dep.target.module
        name = mod2name[root]
        size = len(tp_group[0].idxs)
        if name in seen_roots:
            continue
        seen_roots.add(name)
        if size < 2:
            refused.append((name, "only one channel"))
            continue
        try:
            groups.append(_group_from_tp(dg, tp_group, name, size))
        except UnsupportedLayerError as e:
            refused.append((name, str(e)))
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if check_surgery and groups:
        groups, bad = _check_surgery(model, example_inputs, groups)
        refused.extend(bad)
    if not groups:
        detail = "; ".join(f"{n}: {w}" for n, w in refused) or "no Conv/Linear layer outside the ignored layers"
        raise NothingPrunableError(f"nothing in this model can be pruned ({detail})")
    return StructureSet(groups, refused, list(ignored_layers), param_shapes)


def _check_surgery(model: nn.Module, example_inputs: Any, groups: list[Group]) -> tuple[list[Group], list[tuple[str, str]]]:
    """Remove one channel from each group on a copy; refuse the groups whose removal breaks the model."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref_shapes = _output_shapes(_forward(model, example_inputs))
    if _trial_prune(model, example_inputs, groups, ref_shapes) is None:  # fast path: all groups at once
        return groups, []
    ok, bad = [], []
    for g in groups:
        err = _trial_prune(model, example_inputs, [g], ref_shapes)
        if err is not None:
            bad.append((g.name, f"removing a channel breaks the forward pass ({err}); "
                                 "a residual tied to the input or a width fixed in forward code?"))
            continue
        ok.append(g)
    return ok, bad


def _trial_prune(model: nn.Module, example_inputs: Any, groups: list[Group], ref_shapes: list) -> str | None:
    """Remove the last channel of each group on a copy of ``model``; the error it causes, or None."""
    trial = copy.deepcopy(model)
    try:
        dg = build_dependency_graph(trial, example_inputs)
        for g in groups:
            root = trial.get_submodule(g.name)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, [g.size - 1]).prune()
        with torch.no_grad():
            shapes = _output_shapes(_forward(trial, example_inputs))
        if shapes != ref_shapes:
            raise RuntimeError(f"output shape changed from {ref_shapes} to {shapes}")
    except Exception as e:  # noqa: BLE001 - any failure means the surgery is unsafe
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None
