"""Surgery: identical function where nothing changes, exact sizes, implants, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from haprune.apply import ImplantConv2d, PlanMismatchError, apply_plan
from haprune.graph import NothingPrunableError, build_structures
from haprune.plan import CostModel, GroupPlan, Plan, make_plan
from nets import make_net


def params(m):
    return sum(p.numel() for p in m.parameters())


def setup(seed=0, **kw):
    net = make_net(seed, **kw)
    x = torch.randn(1, kw.get("in_ch", 1), 10, 10)
    S = build_structures(net, x)
    return net, x, S, CostModel(net, S, x)


def test_ratio_zero_leaves_outputs_identical():
    net, x, S, cost = setup(widths=(4, 6), blocks=2)
    plan = make_plan(S, torch.rand(S.num_structures, dtype=torch.float64), cost, 0.0)
    pruned = apply_plan(net, plan, x, structures=S)
    xb = torch.randn(5, 1, 10, 10)
    assert torch.equal(pruned(xb), net(xb))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), widths=st.lists(st.integers(2, 9), min_size=1, max_size=3),
       blocks=st.integers(1, 2), target=st.floats(0.1, 0.6), implant=st.sampled_from([0.0, 0.25, 1.0]),
       kind=st.sampled_from(["1x1", "separable"]), k=st.sampled_from([3, 5]), budget=st.sampled_from(["params", "flops"]))
def test_random_residual_cnns_prune_to_the_planned_size(seed, widths, blocks, target, implant, kind, k, budget):
    net = make_net(seed, widths=tuple(widths), blocks=blocks, classes=3, k=k, stem_bias=bool(seed % 2))
    x = torch.randn(1, 1, 9, 9)
    S = build_structures(net, x)
    cost = CostModel(net, S, x)
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    try:
        plan = make_plan(S, scores, cost, target, implant_ratio=implant, implant_kind=kind, budget=budget,
                         tolerance=0.15)  # tiny nets have coarse structures
    except ValueError:  # too coarse or capped: refused with a message, nothing built
        event("plan refused")
        return
    event("pruned")
    before = copy.deepcopy(net.state_dict())
    pruned = apply_plan(net, plan, x, structures=S)
    xb = torch.randn(3, 1, 9, 9)
    assert pruned(xb).shape == net(xb).shape
    assert params(pruned) == plan.achieved["params_after"]
    assert all(torch.equal(before[k_], v) for k_, v in net.state_dict().items())  # user's model untouched
    n_impl = sum(m.num_implanted for m in pruned.modules() if isinstance(m, ImplantConv2d))
    assert (n_impl > 0) == (plan.counts()["implanted"] > 0)


def _reference_masked(net, plan, S, x):
    """The removal-only model with the implanted channels' conv rows zeroed: what a zero implant must equal."""
    removal_only = Plan({n: GroupPlan(g.size, g.remove) for n, g in plan.groups.items()})
    masked = copy.deepcopy(net)
    for name, gp in plan.groups.items():
        for conv in S[name].implantable:
            with torch.no_grad():
                masked.get_submodule(conv).weight[gp.implant] = 0
    return apply_plan(masked, removal_only, x, structures=S)


@pytest.mark.parametrize("kind", ["1x1", "separable"])
def test_zero_implant_equals_removed_plus_zeroed_rows(kind):
    net, x, S, cost = setup(widths=(6, 8), blocks=2)
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    plan = make_plan(S, scores, cost, 0.4, implant_ratio=0.5, implant_kind=kind, tolerance=0.2)
    assert plan.counts()["implanted"] > 0
    implanted = apply_plan(net, plan, x, structures=S, implant_init="zeros")
    ref = _reference_masked(net, plan, S, x)
    xb = torch.randn(4, 1, 10, 10)
    torch.testing.assert_close(implanted(xb), ref(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["1x1", "separable"])
def test_lstsq_implant_reproduces_a_1x1_representable_channel_exactly(kind):
    net, x, S, cost = setup(widths=(6, 8), blocks=1)
    net = net.double()
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plan = make_plan(S, scores, cost, 0.3, implant_ratio=0.5, implant_kind=kind, tolerance=0.2)
    assert plan.counts()["implanted"] > 0
    # make every implanted row of every implanted conv a pure centre tap: representable by a 1x1 conv
    for name, gp in plan.groups.items():
        for conv in S[name].implantable:
            w = net.get_submodule(conv).weight
            with torch.no_grad():
                centre = w[gp.implant, :, 1, 1].clone()
                w[gp.implant] = 0
                w[gp.implant, :, 1, 1] = centre
    removal_only = apply_plan(net, Plan({n: GroupPlan(g.size, g.remove) for n, g in plan.groups.items()}), x.double(),
                              structures=S)
    calib = [(torch.randn(16, 1, 10, 10, dtype=torch.float64), None)]
    fitted = apply_plan(net, plan, x.double(), structures=S, implant_init="lstsq", calibration=calib)
    xb = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(fitted(xb), removal_only(xb), rtol=1e-7, atol=1e-7)
    zeros = apply_plan(net, plan, x.double(), structures=S, implant_init="zeros")
    assert (zeros(xb) - removal_only(xb)).abs().max() > 1e-3  # the fit did something


def test_inplace_modifies_only_after_success_and_default_copies():
    net, x, S, cost = setup()
    plan = make_plan(S, torch.rand(S.num_structures, dtype=torch.float64), cost, 0.4)
    n0 = params(net)
    out = apply_plan(net, plan, x, structures=S)
    assert params(net) == n0 and out is not net
    bad = Plan({**plan.groups, "no.such.layer": GroupPlan(3, [0])})
    with pytest.raises(PlanMismatchError, match="no.such.layer"):
        apply_plan(net, bad, x, structures=S, inplace=True)
    assert params(net) == n0  # nothing half-done
    same = apply_plan(net, plan, x, structures=S, inplace=True)
    assert same is net and params(net) == plan.achieved["params_after"]


def test_plan_for_another_model_is_refused():
    net, x, S, cost = setup(widths=(4, 6))
    other, xo, So, costo = setup(widths=(5, 7))
    plan = make_plan(So, torch.rand(So.num_structures, dtype=torch.float64), costo, 0.3, tolerance=0.2)
    with pytest.raises(PlanMismatchError, match="channels here"):
        apply_plan(net, plan, x)


class InputResidual(nn.Module):
    """x + conv(x): the conv's output channels are tied to the model input, which cannot shrink."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = x + self.conv(x)
        x = torch.relu(self.head(torch.relu(self.body(x))))
        return self.fc(x.mean((2, 3)))


class BakedWidth(nn.Module):
    """A width written into forward code: pruning conv breaks the view."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], 4, 16).reshape(x.shape[0], 64))


def test_residual_tied_to_input_is_refused_with_a_reason():
    S = build_structures(InputResidual(), torch.randn(1, 3, 6, 6))
    assert "conv" in [n for n, _ in S.refused]
    assert "body" in S.names and "conv" not in S.names
    why = dict(S.refused)["conv"]
    assert "breaks the forward pass" in why


def test_width_baked_into_forward_is_refused_and_nothing_prunable_raises():
    with pytest.raises(NothingPrunableError, match="breaks the forward pass"):
        build_structures(BakedWidth(), torch.randn(1, 1, 4, 4))


def test_nothing_prunable():
    with pytest.raises(NothingPrunableError):
        build_structures(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 4))


def test_ignored_layers_are_kept_whole_and_unknown_names_explained():
    net, x, S, cost = setup(widths=(4, 6))
    assert S.ignored == ["fc"]
    S2 = build_structures(net, x, ignored_layers=["stem"])
    assert "stem" not in S2.names and all("stem" not in g.out_modules for g in S2)
    with pytest.raises(ValueError, match="not found in the model"):
        build_structures(net, x, ignored_layers=["nope"])


class WithGroupNorm(nn.Module):
    """GroupNorm couples channels in groups: haprune does not slice it, so its group must be refused, not broken."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.gn(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_unsupported_layer_refuses_its_group_and_names_the_fix():
    S = build_structures(WithGroupNorm(), torch.randn(1, 1, 6, 6))
    why = dict(S.refused)["a"]
    assert "GroupNorm" in why and "ignored_layers" in why
    assert S.names == ["b"]


class ScatterImplant(nn.Module):
    """The official formulation: full-width k x k output, implanted channels overwritten by a 1x1 conv."""

    def __init__(self, conv: nn.Conv2d, implant: nn.Conv2d, positions: list[int]):
        super().__init__()
        self.conv, self.implant, self.positions = conv, implant, positions

    def forward(self, x):
        out = self.conv(x).clone()
        out[:, self.positions] = self.implant(x)
        return out


@pytest.mark.parametrize("seed", range(4))
def test_permuted_implants_equal_the_scatter_formulation(seed):
    net, x, S, cost = setup(seed, widths=(6, 8, 10), blocks=2)
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plan = make_plan(S, scores, cost, 0.4, implant_ratio=0.5, tolerance=0.2)
    assert plan.counts()["implanted"] > 0
    calib = [(torch.randn(8, 1, 10, 10), None)]
    ours = apply_plan(net, plan, x, structures=S, implant_init="lstsq", calibration=calib)  # non-zero implants
    ref = apply_plan(net, Plan({n: GroupPlan(g.size, g.remove) for n, g in plan.groups.items()}), x, structures=S)
    for name, gp in plan.groups.items():
        if not gp.implant:
            continue
        alive = sorted(gp.keep + gp.implant)
        positions = [alive.index(c) for c in sorted(gp.implant)]
        for conv_name in S[name].implantable:
            implant = copy.deepcopy(ours.get_submodule(conv_name).implant)
            # our model orders an implanted input group as [kept | implanted]; the reference keeps index order
            for g in S:
                if any(sl.tensor == f"{conv_name}.weight" and sl.dim == 1 for sl in g.slices):
                    gp_in = plan.groups[g.name]
                    ours_order = gp_in.keep + gp_in.implant if gp_in.implant else sorted(gp_in.keep)
                    ref_order = sorted(gp_in.keep + gp_in.implant)
                    src = [ours_order.index(c) for c in ref_order]
                    with torch.no_grad():
                        implant.weight.copy_(implant.weight[:, src])
            parent, _, leaf = conv_name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, leaf,
                    ScatterImplant(ref.get_submodule(conv_name), implant, positions))
    xb = torch.randn(3, 1, 10, 10)
    torch.testing.assert_close(ours(xb), ref(xb), rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, ScatterImplant) for m in ours.modules())
