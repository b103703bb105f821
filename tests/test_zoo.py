"""Correct on every graph: the model zoo (tests/zoo.py) through structures, plan, apply, merge and save/load.

For every zoo model: ``build_structures`` works or refuses with a clear, tested reason; generated plans (random
scores, targets 0.3-0.7) give a pruned model whose outputs still depend on the input; on BatchNorm-only
convolutional nets the pruned model computes exactly what the dense model computes with the removed channels'
consumer weights zeroed (the surgery removed exactly the planned channels, everywhere they are coupled); implants
merge; save/load gives identical outputs; the plan's parameter and FLOP counts equal the pruned model's measured
ones within 1 percentage point (issue #19 item 2: xfail where the cost model is not exact yet).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import haprune
from haprune.graph import StructureSet, UnsupportedModelError, build_structures, channel_shuffles
from haprune.io import load_pruned, save_pruned
from haprune.plan import BudgetError, CostModel, make_plan
from haprune.report import count_flops, count_params
from zoo import HF_MODELS, ZOO, make

WORKING = [n for n in ZOO if ZOO[n].refusal is None]
REFUSED = [n for n in ZOO if ZOO[n].refusal is not None]
# every norm in a group is per channel (BatchNorm): removing a channel == zeroing its consumers' weights
BN_ONLY = ["resnet_basic", "resnet_bottleneck", "densenet", "mobilenetv2", "resnext", "regnet_y", "mobilenetv3",
           "efficientnet", "hf_resnet", "hf_mobilenet_v2", "hf_regnet", "hf_efficientnet"]
GROUPED = ["resnext", "regnet_y", "hf_regnet"]
BARE_PARAM = ["convnext", "hf_convnext"]  # layer scale: a bare nn.Parameter in a prunable group

# where a known open issue keeps a model from passing: none since the exact cost model (issue #19 items 2, 3) and
# apply_plan removing a grouped conv's bundles (Group.channels)
COST_XFAIL: dict[str, str] = {}


def _cases(names, xfails: dict[str, str] | None = None):
    """pytest params, with a non-strict xfail naming the open issue where one applies."""
    for name in names:
        reason = (xfails or {}).get(name)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        yield pytest.param(name, marks=marks, id=name)


_CACHE: dict[str, tuple[nn.Module, torch.Tensor, StructureSet, CostModel]] = {}


def _setup(name: str):
    if name not in _CACHE:
        model, x = make(name)
        s = build_structures(model, x)
        _CACHE[name] = (model, x, s, CostModel(model, s, x))
    return _CACHE[name]


def _inputs(example: torch.Tensor, n: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, *example.shape[1:], generator=torch.Generator().manual_seed(seed))


def _spread(model: nn.Module, xs: torch.Tensor) -> float:
    with torch.no_grad():
        y = model.eval()(xs)
    return float(y.double().std(0).mean())


def _plan(name: str, seed: int, target: float, implant_ratio: float = 0.0):
    model, x, s, cost = _setup(name)
    scores = torch.rand(s.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    try:
        return make_plan(s, scores, cost, target, implant_ratio=implant_ratio, tolerance=0.05, seed=seed)
    except BudgetError:
        return None


def _masked(model: nn.Module, s: StructureSet, plan) -> nn.Module:
    """The dense model with every removed structure's consumer weights (Conv / Linear input columns) zeroed."""
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters())
    for g in s:
        removed = torch.as_tensor(plan.groups[g.name].remove, dtype=torch.long)
        if not len(removed):
            continue
        for sl in g.param_slices:
            mod, _, leaf = sl.tensor.rpartition(".")
            m = masked.get_submodule(mod) if mod else masked
            if leaf != "weight" or sl.dim != 1 or mod not in g.in_modules:
                continue
            if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                continue
            at = torch.isin(sl.root_idxs, removed)
            with torch.no_grad():
                params[sl.tensor].index_fill_(1, sl.idxs[at], 0.0)
    return masked


# ------------------------------------------------------------------------------------------- structures

@pytest.mark.parametrize("name", WORKING)
def test_structures_on_every_zoo_model(name):
    model, x, s, _ = _setup(name)
    assert len(s) >= 1 and s.num_structures >= 2
    # every group passes its own trial surgery; reductions cover every structure
    assert s.numel().min() > 0, "a structure owns no parameter"
    if name in GROUPED:
        assert any(g.channel_groups > 1 for g in s), s.describe()
        assert not any("grouped convolution" in why for _, why in s.refused), s.describe()
    if name in BARE_PARAM:
        assert any(g.bare_params for g in s), s.describe()
    if name in BARE_PARAM + ["vit", "hf_vit", "hf_deit"]:  # class token, position embedding: sliced, not refused
        assert not any("bare nn.Parameter" in why for _, why in s.refused), s.describe()


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_say_why(name):
    model, x = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=ZOO[name].refusal) as e:
        build_structures(model, x)
    assert "Torch-Pruning" in str(e.value) and "ZeroDivisionError" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_channel_shuffle_detected_only_where_there_is_one():
    model, x = make("shufflenet")
    assert channel_shuffles(model, x)[:1] == ["stages.0"]
    for name in ("resnet_basic", "swin", "vit"):  # attention reshapes / window folds are not shuffles
        m, xx = make(name)
        assert channel_shuffles(m, xx) == []


def test_grouped_conv_structures_are_bundles():
    """A ResNeXt block: the 3x3 conv has groups=4, so structure j of the group feeding it is the 4 channels
    j, j + n, j + 2n, j + 3n, and its weight's input column j belongs to structure j."""
    model, x, s, _ = _setup("resnext")
    g = s["layers.0.0.conv1"]
    conv = model.get_submodule("layers.0.0.conv2")
    assert g.channel_groups == conv.groups == 4 and g.size == conv.in_channels // 4
    assert g.channels([0, 1]) == sorted([0, 1] + [b * g.size + j for b in (1, 2, 3) for j in (0, 1)])
    col = next(sl for sl in g.param_slices if sl.tensor == "layers.0.0.conv2.weight")
    assert col.dim == 1 and col.idxs.tolist() == list(range(g.size)) and col.root_idxs.tolist() == list(range(g.size))
    rows = next(sl for sl in g.param_slices if sl.tensor == "layers.0.0.conv1.weight")
    assert sorted(rows.idxs.tolist()) == list(range(conv.in_channels))
    assert (rows.root_idxs == rows.idxs % g.size).all()
    with pytest.raises(IndexError):
        g.channels([g.size])


def test_bad_example_inputs_are_a_clear_error():
    model, x = make("resnet_basic")
    with pytest.raises(ValueError, match="does not run on example_inputs"):
        build_structures(model, torch.randn(1, 5, 32, 32))


# ------------------------------------------------------------------------------------------- untouched

def _snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "mobilenetv3", "regnet_y", "convnext", "hf_efficientnet"])
def test_build_structures_leaves_a_train_mode_model_bit_identical(name):
    """Issue #18 item 3: a model in train mode (one BatchNorm frozen in eval mode: a mixed state) keeps every
    parameter, buffer (running statistics, num_batches_tracked) and train/eval flag."""
    model, x = make(name)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        bns[0].eval()
    state, modes, grads = _snapshot(model)
    build_structures(model, x)
    state2, modes2, grads2 = _snapshot(model)
    assert modes2 == modes and grads2 == grads
    assert state2.keys() == state.keys()
    changed = [k for k in state if not torch.equal(state[k], state2[k])]
    assert changed == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


# ------------------------------------------------------------------------------------------- generated plans

@pytest.mark.parametrize("name", list(_cases(WORKING)))
@settings(deadline=None, max_examples=3, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), target=st.floats(0.3, 0.7))
def test_pruned_outputs_still_depend_on_the_input(name, seed, target):
    model, x, s, cost = _setup(name)
    plan = _plan(name, seed, target)
    if plan is None:
        return
    xs = _inputs(x)
    dense = _spread(model, xs)
    pruned = haprune.apply_plan(model, plan, x, structures=s)
    assert _spread(pruned, xs) > 1e-3 * dense
    if name in BN_ONLY:  # exactly the planned channels are gone, everywhere they are coupled
        with torch.no_grad():
            want = _masked(model, s, plan).eval()(xs)
            got = pruned.eval()(xs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


def _implantable(name: str) -> bool:
    return any(g.implantable for g in _setup(name)[2])


@pytest.mark.parametrize("name", list(_cases([n for n in WORKING if n not in HF_MODELS])))
def test_implants_merge_and_save_load_round_trip(name, tmp_path):
    model, x, s, cost = _setup(name)
    plan = None
    for target in (0.5, 0.3, 0.15):  # a ViT's only prunable groups are its MLPs: half the parameters is too much
        plan = _plan(name, 0, target, implant_ratio=0.5 if _implantable(name) else 0.0)
        if plan is not None:
            break
    assert plan is not None and any(gp.remove for gp in plan.groups.values())
    pruned = haprune.apply_plan(model, plan, x, structures=s)
    xs = _inputs(x)
    with torch.no_grad():
        ref = pruned.eval()(xs)
    if any(gp.implant for gp in plan.groups.values()):
        merged = haprune.merge_implants(pruned)
        assert not any(isinstance(m, haprune.ImplantConv2d) for m in merged.modules())
        with torch.no_grad():
            torch.testing.assert_close(merged.eval()(xs), ref, rtol=1e-4, atol=1e-5)
    save_pruned(tmp_path / "run", pruned, plan)
    fresh = ZOO[name].factory()  # another initialisation: only the saved weights may matter
    loaded = load_pruned(tmp_path / "run", fresh, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(xs), ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- plan counts

@pytest.mark.parametrize("name", list(_cases(WORKING, COST_XFAIL)))
def test_plan_counts_equal_measured_counts(name, plans: int = int(os.environ.get("HAPRUNE_ZOO_PLANS", "5"))):
    """Issue #19 item 2: over ``plans`` generated plans (5; HAPRUNE_ZOO_PLANS=20 for the issue's check) (random scores, targets 0.3-0.7), the plan's parameter and
    FLOP counts equal the pruned model's measured ones within 1 percentage point of the dense model."""
    model, x, s, cost = _setup(name)
    dense_p, dense_f = count_params(model), count_flops(model, x)
    assert cost.dense() == (dense_p, dense_f)
    worst = (0.0, 0.0)
    rng = torch.Generator().manual_seed(11)
    done = 0
    for i in range(plans):
        target = 0.3 + 0.4 * float(torch.rand(1, generator=rng))
        plan = _plan(name, 100 + i, target)
        if plan is None:
            continue
        done += 1
        planned = cost.count_plan(plan)
        pruned = haprune.apply_plan(model, plan, x, structures=s)
        measured = (count_params(pruned), count_flops(pruned, x))
        worst = (max(worst[0], abs(planned[0] - measured[0]) / dense_p),
                 max(worst[1], abs(planned[1] - measured[1]) / dense_f))
    assert done >= plans // 2
    assert worst[0] <= 0.01 and worst[1] <= 0.01, f"params off by {worst[0]:.2%}, FLOPs by {worst[1]:.2%}"


# ------------------------------------------------------------------------------------------- graph-level surgery

def _tp_prune(model: nn.Module, x: torch.Tensor, s: StructureSet, removed: dict[str, list[int]]) -> nn.Module:
    """Remove structures the way surgery must: each group's root channels ``Group.channels(removed)``."""
    from haprune.graph import build_dependency_graph

    work = copy.deepcopy(model)
    dg = build_dependency_graph(work, x)
    for g in s:
        if removed.get(g.name):
            root = work.get_submodule(g.name)
            dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                 g.channels(removed[g.name])).prune()
    return work.eval()


@pytest.mark.parametrize("name", GROUPED + ["resnet_bottleneck"])
@settings(deadline=None, max_examples=4, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_grouped_conv_surgery_on_bundles_is_exact(name, data):
    """Removing any structures of any groups (bundles of channels across a grouped conv's blocks) gives exactly
    the dense model with those channels' consumer weights zeroed."""
    model, x, s, _ = _setup(name)
    removed = {g.name: sorted(data.draw(st.sets(st.integers(0, g.size - 1), max_size=g.size - 1), label=g.name))
               for g in s}

    class P:  # the part of a Plan that _masked reads
        groups = {n: type("G", (), {"remove": r})() for n, r in removed.items()}

    pruned = _tp_prune(model, x, s, removed)
    xs = _inputs(x)
    with torch.no_grad():
        want, got = _masked(model, s, P).eval()(xs), pruned(xs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)
    for g in s:  # every grouped conv keeps its groups and an equal share of channels per block
        for m in g.in_modules + g.out_modules:
            conv = pruned.get_submodule(m)
            if isinstance(conv, nn.Conv2d) and conv.groups > 1:
                assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0


@pytest.mark.parametrize("name", ["convnext", "hf_convnext"])
def test_bare_parameters_are_sliced_with_their_group(name):
    """ConvNeXt's layer scale: removing structures of its group shrinks the bare nn.Parameter with the channels
    (the same positions) and the model still runs and depends on its input."""
    model, x, s, _ = _setup(name)
    g = next(g for g in s if g.bare_params)
    drop = list(range(0, g.size, 3))
    pruned = _tp_prune(model, x, s, {g.name: drop})
    keep = [i for i in range(g.size) if i not in drop]
    dense_params, pruned_params = dict(model.named_parameters()), dict(pruned.named_parameters())
    for name_ in g.bare_params:
        sl = next(sl for sl in g.slices if sl.tensor == name_)
        kept_positions = torch.sort(sl.idxs[torch.isin(sl.root_idxs, torch.tensor(keep))]).values
        want = dense_params[name_].index_select(sl.dim, kept_positions)
        torch.testing.assert_close(pruned_params[name_], want, rtol=0, atol=0)
    xs = _inputs(x)
    assert _spread(pruned, xs) > 1e-3 * _spread(model, xs)
