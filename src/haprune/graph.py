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

Grouped convolutions (``groups > 1``, not depthwise) follow Torch-Pruning's rule: a channel can only go together
with the channel at the same position in every other block of ``channels / groups``, so such a group's structure
is a *bundle* of ``channel_groups`` channels (:meth:`Group.channels` lists them). Bare ``nn.Parameter`` tensors
used in forward code (ConvNeXt's layer scale, a ViT's class token and position embedding) are sliced along the
dimension Torch-Pruning finds coupled (its "unwrapped parameters"). Both pass the same trial surgery as every
other group. A model whose graph Torch-Pruning cannot build (a ShuffleNet channel shuffle) is refused as a whole
with :class:`UnsupportedModelError`.

Nothing here changes the user's model: every forward pass runs in eval mode without gradients on the model or on
a copy, so parameters, buffers (BatchNorm statistics) and train/eval flags stay bit-identical.
"""
from __future__ import annotations

import copy
import itertools
import math
import weakref
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
    "UnsupportedModelError",
    "GroupedChannelsError",
    "CheckedDependencyGraph",
    "build_dependency_graph",
    "default_ignored_layers",
    "run_forward",
    "output_shapes",
    "channel_shuffles",
]


class NothingPrunableError(ValueError):
    """The model has no group of channels that haprune can prune."""


class UnsupportedLayerError(ValueError):
    """A group couples a layer whose tensors haprune cannot slice."""


class UnsupportedModelError(ValueError):
    """Torch-Pruning cannot build this model's dependency graph, so no group can be trusted."""


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
    # > 1 where a grouped convolution is coupled: structure j is the bundle of root channels j, j + size, ...,
    # j + (channel_groups - 1) * size (the same position in every block), which must go together
    channel_groups: int = 1
    bare_params: list[str] = field(default_factory=list)  # nn.Parameters used in forward code, sliced with the group

    @property
    def param_slices(self) -> list[TensorSlice]:
        return [s for s in self.slices if s.is_param]

    @property
    def num_channels(self) -> int:
        """Output channels of the root module (``size * channel_groups``)."""
        return self.size * self.channel_groups

    def channels(self, structures: Iterable[int]) -> list[int]:
        """The root module's channel indices of the given structures (sorted): what surgery removes. The identity
        unless a grouped convolution bundles channels (:attr:`channel_groups`)."""
        idxs = [int(i) for i in structures]
        bad = [i for i in idxs if not 0 <= i < self.size]
        if bad:
            raise IndexError(f"group {self.name!r} has {self.size} structures; got {bad[:5]}")
        return sorted(i + b * self.size for i in idxs for b in range(self.channel_groups))


# module type -> (tensors sliced when its output channels are pruned, when its input channels are pruned)
_CONV_TENSORS = ({"weight": 0, "bias": 0}, {"weight": 1})
_CONVT_TENSORS = ({"weight": 1, "bias": 0}, {"weight": 0})
_LINEAR_TENSORS = ({"weight": 0, "bias": 0}, {"weight": 1})
_NORM_TENSORS = ({"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}, {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0})


def _tensor_dims(module: nn.Module, out: bool) -> dict[str, int]:
    """Which of ``module``'s tensors are sliced, along which dim, when its out (or in) channels are pruned."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.out_channels == module.in_channels and module.groups > 1
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
    """The classifier: the last Conv/Linear executed in the forward pass (its outputs are the model's outputs).

    The pass runs in eval mode without gradients (flags restored): the model's BatchNorm statistics do not move."""
    order: list[str] = []
    hooks = {m: (lambda mod, i, o, n=name: order.append(n)) for name, m in model.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    forward_with_hooks(model, example_inputs, hooks)
    return order[-1:] if order else []


def run_forward(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a dict as keyword arguments, a tuple / list as positional ones, else one
    argument. Nothing else (no mode change, no ``no_grad``): callers choose."""
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
            run_forward(model, inputs)
    finally:
        for h in handles:
            h.remove()


def channel_widths(module: nn.Module) -> tuple[int, int]:
    """(input, output) channels of a Conv or (features of a) Linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model output (a tensor, or nested tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in output_shapes(o)]
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
            bundle = f" (bundles of {g.channel_groups} channels: grouped conv)" if g.channel_groups > 1 else ""
            couples = ", ".join(g.out_modules + g.in_modules + g.bare_params)
            lines.append(f"  {g.name}: {g.size} channels{bundle}, couples {couples}")
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


class GroupedChannelsError(ValueError):
    """Channels removed from a grouped convolution unevenly: Torch-Pruning would slice the wrong weights."""


class CheckedDependencyGraph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph, refusing a removal that its grouped-convolution rule cannot slice.

    Torch-Pruning removes input channels of a grouped convolution by keeping the first columns of its weight,
    which is right only when the same positions go from every block of ``channels / groups``; anything else
    would silently keep the wrong weights (or fail later). Remove whole bundles: :meth:`Group.channels`."""

    def get_pruning_group(self, module, pruning_fn, idxs):
        group = super().get_pruning_group(module, pruning_fn, idxs)
        for item in group:
            target = item.dep.target.module
            groups = _conv_groups(target) if isinstance(target, nn.Module) else 1
            if groups <= 1 or not len(item.idxs):
                continue
            is_out = self.is_out_channel_pruning_fn(item.dep.handler)
            width = (target.out_channels if is_out else target.in_channels) // groups
            per_block: dict[int, set[int]] = {}
            for p in item.idxs:
                per_block.setdefault(int(p) // width, set()).add(int(p) % width)
            if len(per_block) != groups or len({frozenset(v) for v in per_block.values()}) != 1:
                name = self._module2name.get(target, type(target).__name__)
                raise GroupedChannelsError(
                    f"removing channels {sorted(int(p) for p in item.idxs)[:8]}... of {name!r} (groups={groups}) "
                    f"unevenly across its {groups} blocks; the same positions must go from every block: remove "
                    f"whole bundles, Group.channels(structure indices)")
        return group


def build_dependency_graph(model: nn.Module, example_inputs: Any) -> tp.DependencyGraph:
    """Trace ``model`` with Torch-Pruning (in eval mode, so BatchNorm statistics are not touched; flags restored).

    Bare ``nn.Parameter`` tensors used in forward code become Torch-Pruning "unwrapped parameters", sliced along
    their last non-singleton dimension (Torch-Pruning's default); :func:`build_structures` checks the result.
    The graph is a :class:`CheckedDependencyGraph`: an uneven removal from a grouped convolution is an error."""
    with eval_mode(model), torch.enable_grad():
        return CheckedDependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)


def _conv_groups(module: nn.Module) -> int:
    """``groups`` of a grouped (not depthwise) convolution, else 1."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        depthwise = module.groups == module.out_channels == module.in_channels
        return 1 if depthwise else module.groups
    return 1


@dataclass
class _RawSlice:
    tensor: str
    dim: int
    pos: torch.Tensor
    roots: torch.Tensor  # root channel of each position
    is_param: bool
    grouped: tuple[str, int, int, bool] | None = None  # (module, groups, channels on this side, is_out) for a grouped conv


def _group_from_tp(dg: tp.DependencyGraph, tp_group, name: str, size: int) -> Group:
    """A haprune Group from a Torch-Pruning group whose root has ``size`` channels."""
    mod2name = dg._module2name
    param2name = getattr(dg, "_param_to_name", {})
    raw: dict[tuple[str, int], _RawSlice] = {}
    out_modules: list[str] = []
    in_modules: list[str] = []
    bare: list[str] = []
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        target = dep.target.module
        roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
        pos = torch.as_tensor(idxs, dtype=torch.long)
        if isinstance(target, nn.Parameter):
            pname = param2name.get(target)
            dim = getattr(dep.target, "pruning_dim", None)
            if pname is None or dim is None:
                raise UnsupportedLayerError("a bare nn.Parameter used in forward code is coupled to this group, "
                                            "and Torch-Pruning gives no name or dimension to slice it along")
            if len(pos) and (int(pos.max()) >= target.shape[dim] or len(torch.unique(pos)) != len(pos)):
                raise UnsupportedLayerError(
                    f"the bare nn.Parameter {pname!r} of shape {tuple(target.shape)} is coupled to this group along "
                    f"dimension {dim}, which does not match the group's channels")
            raw.setdefault((pname, dim), _RawSlice(pname, dim, pos, roots, True))
            bare.append(pname)
            continue
        if not isinstance(target, nn.Module) or target not in mod2name:
            continue  # an op without tensors (add, cat, flatten, ...)
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        mname = mod2name[target]
        dims = _tensor_dims(target, is_out)
        if not dims:
            continue
        (out_modules if is_out else in_modules).append(mname)
        groups = _conv_groups(target)
        if groups > 1 and target.transposed:
            raise UnsupportedLayerError(f"grouped transposed convolution {mname!r} (groups={groups}); "
                                        "add it to ignored_layers")
        for tname, dim in dims.items():
            t = getattr(target, tname, None)
            if t is None:
                continue
            full = f"{mname}.{tname}" if mname else tname
            info = (mname, groups, target.out_channels if is_out else target.in_channels, is_out) if groups > 1 else None
            # the same tensor reached twice (depthwise in/out): keep one
            raw.setdefault((full, dim), _RawSlice(full, dim, pos, roots, isinstance(t, nn.Parameter), info))
    channel_groups = math.lcm(1, *(r.grouped[1] for r in raw.values() if r.grouped))
    if size % channel_groups:
        conv = next(r.grouped for r in raw.values() if r.grouped)
        raise UnsupportedLayerError(f"grouped convolution {conv[0]!r} (groups={conv[1]}): the group's {size} "
                                    f"channels do not split into {channel_groups} equal blocks")
    n = size // channel_groups
    slices = [_finish_slice(r, n) for r in raw.values()]
    # an implant replaces whole output rows: the conv's dim 0 must map one-to-one onto all the group's channels
    full_rows = {s.tensor.rpartition(".")[0] for s in slices
                 if s.tensor.endswith(".weight") and s.dim == 0 and len(s.idxs) == n}
    implantable = [m for m in out_modules if channel_groups == 1 and m in full_rows
                   and _is_implantable(dg.model.get_submodule(m))]
    return Group(name, n, slices, _dedup(out_modules), _dedup(in_modules), _dedup(implantable), channel_groups,
                 _dedup(bare))


def _finish_slice(r: _RawSlice, n: int) -> TensorSlice:
    """Root channels -> structures (root channel ``c`` is in structure ``c % n``); a grouped conv's input columns
    are shared by its blocks, so its weight's dim 1 is indexed by the position inside a block."""
    struct = r.roots % n
    if r.grouped is None:
        return TensorSlice(r.tensor, r.dim, r.pos, struct, r.is_param)
    mname, groups, channels, is_out = r.grouped
    width = channels // groups
    blocks, local = r.pos // width, r.pos % width
    for s in torch.unique(struct).tolist():
        at = struct == s
        per_block = {}
        for b, j in zip(blocks[at].tolist(), local[at].tolist()):
            per_block.setdefault(b, set()).add(j)
        if len(per_block) != groups or len({frozenset(v) for v in per_block.values()}) != 1:
            raise UnsupportedLayerError(
                f"grouped convolution {mname!r} (groups={groups}): its channel blocks do not line up with the "
                "coupled channels (each channel must go with the same position in every block); "
                "add it to ignored_layers")
    if is_out or r.dim == 0:
        return TensorSlice(r.tensor, r.dim, r.pos, struct, r.is_param)
    cols, first = torch.unique(local, return_inverse=True)
    owner = torch.empty(len(cols), dtype=torch.long)
    owner[first] = struct
    return TensorSlice(r.tensor, r.dim, cols, owner, r.is_param)


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
        model: any ``nn.Module``; it is not modified (parameters, buffers and train/eval flags stay bit-identical).
        example_inputs: a tensor (or tuple / dict of them) the model accepts, for tracing; a batch of 1 is enough.
        ignored_layers: fully-qualified names of modules whose output channels must not change. ``None``: the
            classifier (the last Conv/Linear in the forward pass). Pass ``[]`` to ignore nothing.
        root_types: module types whose output channels start a group.
        check_surgery: try removing one structure of every group on a copy and refuse the groups whose removal
            breaks the forward pass or changes the output shape.

    Raises:
        ValueError: when the model does not run on ``example_inputs``.
        UnsupportedModelError: when Torch-Pruning cannot build the model's dependency graph (a channel shuffle).
        NothingPrunableError: when no group is left.
    """
    order: list[str] = []
    hooks = {m: (lambda mod, i, o, n=name: order.append(n)) for name, m in model.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    try:
        forward_with_hooks(model, example_inputs, hooks)
    except Exception as e:  # noqa: BLE001 - the user's model or inputs, reported as such
        raise ValueError(f"the model does not run on example_inputs ({type(e).__name__}: {_first_line(e)}); "
                         "pass inputs the model accepts (a batch of 1 is enough)") from e
    if ignored_layers is None:
        ignored_layers = order[-1:]
    ignored_mods = _module_names(model, ignored_layers)
    try:
        dg = build_dependency_graph(model, example_inputs)
        tp_groups = list(dg.get_all_groups(ignored_layers=list(ignored_mods), root_module_types=root_types))
    except Exception as e:  # noqa: BLE001 - Torch-Pruning's tracing failed: refuse the model, say why
        raise UnsupportedModelError(_graph_failure(model, example_inputs, e)) from e
    groups: list[Group] = []
    refused: list[tuple[str, str]] = []
    mod2name = dg._module2name
    # get_all_groups skips groups that contain an ignored layer's output channels
    seen_roots: set[str] = set()
    for tp_group in tp_groups:
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
            g = _group_from_tp(dg, tp_group, name, size)
        except UnsupportedLayerError as e:
            refused.append((name, str(e)))
            continue
        if g.size < 2:
            refused.append((name, f"only one structure (bundles of {g.channel_groups} channels: grouped conv)"))
            continue
        groups.append(g)
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if check_surgery and groups:
        groups, bad = _check_surgery(model, example_inputs, groups)
        refused.extend(bad)
    if not groups:
        detail = "; ".join(f"{n}: {w}" for n, w in refused) or "no Conv/Linear layer outside the ignored layers"
        raise NothingPrunableError(f"nothing in this model can be pruned ({detail})")
    return StructureSet(groups, refused, list(ignored_layers), param_shapes)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e)
    return text.splitlines()[0][:limit] if text else ""


def _graph_failure(model: nn.Module, example_inputs: Any, e: BaseException) -> str:
    """Why Torch-Pruning could not trace ``model``: the upstream error, and a channel shuffle if there is one."""
    tb = e.__traceback__
    where = ""
    while tb is not None:  # the innermost Torch-Pruning frame
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            mod = tb.tb_frame.f_globals.get("__name__", "torch_pruning")
            where = f" in {mod}.{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    upstream = f"{type(e).__name__}{where}: {_first_line(e)}"
    try:
        shuffles = channel_shuffles(model, example_inputs)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the refusal stands without it
        shuffles = []
    if shuffles:
        return (f"Torch-Pruning {tp.__version__} cannot map channel indices through the channel shuffle in "
                f"{', '.join(shuffles[:3])}{' ...' if len(shuffles) > 3 else ''} (a reshape of the channels into "
                f"(groups, channels / groups) and a transpose, as in ShuffleNet): {upstream}. This is a limitation "
                "of Torch-Pruning's reshape index mapping, not of the model; haprune refuses the whole model rather "
                "than guess which channels are coupled. Prune the blocks without the shuffle by hand, or drop the "
                "shuffle")
    return (f"Torch-Pruning {tp.__version__} cannot build this model's dependency graph ({upstream}); haprune refuses "
            "the model rather than guess which channels are coupled. This is a limitation of Torch-Pruning's "
            "tracing; report the model there, or simplify the operation it names")


def channel_shuffles(model: nn.Module, example_inputs: Any) -> list[str]:
    """Modules whose forward code shuffles channels: a reshape of dim 1 of a (N, C, ...) tensor into
    (N, g, C / g, ...) followed by a transpose (or permute) of those two dimensions. One forward pass, eval mode,
    no gradients; the model is not changed."""
    from torch.overrides import TorchFunctionMode

    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    found: list[str] = []
    split: dict[int, weakref.ref] = {}  # id -> the tensors made by splitting the channel dimension

    def is_split(t: torch.Tensor) -> bool:
        ref = split.get(id(t))
        return ref is not None and ref() is t

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return out
            if name in ("view", "reshape") and x.dim() >= 3 and out.dim() == x.dim() + 1:
                if (out.shape[0] == x.shape[0] and out.shape[1] > 1 and out.shape[2] > 1
                        and out.shape[1] * out.shape[2] == x.shape[1] and out.shape[3:] == x.shape[2:]):
                    split[id(out)] = weakref.ref(out)
            elif is_split(x):
                dims = None
                if name in ("transpose", "swapaxes", "swapdims") and len(args) >= 3:
                    dims = {int(args[1]) % x.dim(), int(args[2]) % x.dim()}
                elif name == "permute":
                    perm = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
                    perm = [int(p) % x.dim() for p in perm]
                    dims = {1, 2} if perm[1] == 2 and perm[2] == 1 else None
                if dims == {1, 2}:
                    found.append(stack[-1] if stack else "(model)")
            return out

    pre = {m: (lambda mod, i: stack.append(names[mod] or "(model)")) for m in names}
    handles = [m.register_forward_pre_hook(h) for m, h in pre.items()]
    post = {m: (lambda mod, i, o: stack.pop() and None) for m in names}  # hooks return None
    try:
        with Watch():
            forward_with_hooks(model, example_inputs, post)
    finally:
        for h in handles:
            h.remove()
    return _dedup(found)


def _check_surgery(model: nn.Module, example_inputs: Any, groups: list[Group]) -> tuple[list[Group], list[tuple[str, str]]]:
    """Remove one structure from each group on a copy; refuse the groups whose removal breaks the model."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref_shapes = output_shapes(run_forward(model, example_inputs))
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
    """Remove the last structure of each group on a copy of ``model``; the error it causes, or None."""
    trial = copy.deepcopy(model)
    try:
        dg = build_dependency_graph(trial, example_inputs)
        for g in groups:
            root = trial.get_submodule(g.name)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, g.channels([g.size - 1])).prune()
        with torch.no_grad():
            shapes = output_shapes(run_forward(trial, example_inputs))
        if shapes != ref_shapes:
            raise RuntimeError(f"output shape changed from {ref_shapes} to {shapes}")
    except Exception as e:  # noqa: BLE001 - any failure means the surgery is unsafe
        return f"{type(e).__name__}: {_first_line(e)}"
    return None
