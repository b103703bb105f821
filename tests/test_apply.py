"""Surgery: identical function where nothing changes, exact sizes, implants, refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from haprune.apply import ImplantConv2d, PlanMismatchError, _output_similarity, apply_plan
from haprune.apply.implant import LstsqAccumulator
from haprune.graph import NothingPrunableError, build_structures
from haprune.plan import CostModel, GroupPlan, Plan, make_plan
from haprune.recover import reestimate_batchnorm
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
    before = copy.deepcopy(net.state_dict())
    if any(gp.implant and not gp.keep for gp in plan.groups.values()):  # only zero implants would carry the signal
        event("refused: a group of zero implants only")
        with pytest.raises(PlanMismatchError, match="zero-initialised implants"):
            apply_plan(net, plan, x, structures=S)
        return
    event("pruned")
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
def test_lstsq_implant_reproduces_a_1x1_representable_channel_exactly(kind, monkeypatch):
    monkeypatch.setattr("haprune.apply._select_implants", lambda *a: None)  # the fit alone, every layer kept
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


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (3, 2, 9), (3, 2, 10), (5, 1, 8), (5, 2, 11)])
def test_lstsq_accumulator_aligns_the_1x1_input_with_the_kxk_centre(k, stride, size):
    """Rows whose only non-zero taps are the centre ones (padding k // 2) are reproduced to 1e-6 in float64;
    the kept rows (full k x k, not 1 x 1-representable) are not part of the fit."""
    torch.manual_seed(k * 10 + stride)
    conv = nn.Conv2d(5, 7, k, stride, k // 2, bias=False).double()
    m = 3
    with torch.no_grad():
        centre = conv.weight[-m:, :, k // 2, k // 2].clone()
        conv.weight[-m:] = 0
        conv.weight[-m:, :, k // 2, k // 2] = centre
    acc = LstsqAccumulator(conv, m)
    for _ in range(2):
        x = torch.randn(4, 5, size, size, dtype=torch.float64)
        acc.add(x, conv(x))
    point = nn.Conv2d(5, m, 1, stride, 0, bias=False).double()
    with torch.no_grad():
        point.weight.copy_(acc.solve())
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    torch.testing.assert_close(point(x), conv(x)[:, -m:], rtol=0, atol=1e-6)
    torch.testing.assert_close(point.weight[:, :, 0, 0], centre, rtol=0, atol=1e-6)


@pytest.mark.parametrize("conv_name", ["layers.0.conv1", "layers.1.conv1", "layers.1.conv2"])  # stride 1, 2, 1
def test_lstsq_fit_errs_less_than_a_zero_implant_on_held_out_inputs(conv_name):
    """On a net's real (post-ReLU, correlated) activations, the fitted 1 x 1 rows reproduce the k x k rows better
    than zero does, on inputs not used for the fit, and the fit is the least-squares optimum on its own data."""
    net = make_net(3, widths=(6, 8), blocks=1).double()
    conv, m = net.get_submodule(conv_name), 3
    seen = []
    hook = conv.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)) and None)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(6):
            net(torch.randn(16, 1, 10, 10, generator=gen, dtype=torch.float64))
    hook.remove()
    acc = LstsqAccumulator(conv, m)
    for inp, out in seen[:4]:
        acc.add(inp, out)
    w = acc.solve()
    point = nn.Conv2d(conv.in_channels, m, 1, conv.stride, 0, bias=False).double()

    def error(weight, pairs):
        with torch.no_grad():
            point.weight.copy_(weight)
            return sum(float(((point(i) - o[:, -m:]) ** 2).sum()) for i, o in pairs)

    held_out, calib = seen[4:], seen[:4]
    assert error(w, held_out) < 0.9 * error(torch.zeros_like(w), held_out)
    for _ in range(3):  # no nearby weight fits the calibration data better
        assert error(w, calib) <= error(w + 1e-3 * torch.randn(w.shape, generator=gen, dtype=w.dtype), calib)


def _implanted_setup(seed=0):
    net, x, S, cost = setup(seed, widths=(6, 8), blocks=2)
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plan = make_plan(S, scores, cost, 0.4, implant_ratio=0.5, tolerance=0.2)
    assert plan.counts()["implanted"] > 0
    gen = torch.Generator().manual_seed(seed + 100)
    calib = [(torch.randn(16, 1, 10, 10, generator=gen), None) for _ in range(2)]
    return net, x, S, plan, calib


def _implant_weights(model):
    return {n: (m.implant[0] if isinstance(m.implant, nn.Sequential) else m.implant).weight
            for n, m in model.named_modules() if isinstance(m, ImplantConv2d)}


@pytest.mark.parametrize("seed", range(3))
def test_lstsq_init_is_never_further_from_the_original_than_zeros_and_each_layer_is_fit_or_zero(seed, monkeypatch):
    net, x, S, plan, calib = _implanted_setup(seed)
    refs = [net(c).detach().double() for c, _ in calib]
    zeros = apply_plan(net, plan, x, structures=S, implant_init="zeros")
    lstsq = apply_plan(net, plan, x, structures=S, implant_init="lstsq", calibration=iter(calib))  # one-shot iterable
    monkeypatch.setattr("haprune.apply._select_implants", lambda *a: None)
    fit_only = apply_plan(net, plan, x, structures=S, implant_init="lstsq", calibration=calib)
    before = copy.deepcopy(lstsq.state_dict())
    assert _output_similarity(lstsq, calib, refs) >= _output_similarity(zeros, calib, refs) - 1e-12
    assert _output_similarity(lstsq, calib, refs) >= _output_similarity(fit_only, calib, refs) - 1e-12
    assert all(torch.equal(before[k_], v) for k_, v in lstsq.state_dict().items())  # scoring put the BN stats back
    fitted = _implant_weights(fit_only)
    for name, w in _implant_weights(lstsq).items():
        assert torch.equal(w, fitted[name]) or not w.any()


def test_a_harmful_fit_falls_back_to_the_zero_init(monkeypatch):
    net, x, S, plan, calib = _implanted_setup(1)
    harmful = lambda self, ridge=1e-8: 50 * torch.randn(self.m, self.conv.in_channels, 1, 1, dtype=torch.float64)
    monkeypatch.setattr(LstsqAccumulator, "solve", harmful)
    lstsq = apply_plan(net, plan, x, structures=S, implant_init="lstsq", calibration=calib)
    zeros = apply_plan(net, plan, x, structures=S, implant_init="zeros")
    assert not any(w.any() for w in _implant_weights(lstsq).values())
    xb = torch.randn(4, 1, 10, 10)
    assert torch.equal(lstsq(xb), zeros(xb))


def test_an_exact_fit_is_kept():
    """Implants only (nothing removed), every implanted row 1 x 1-representable: the fit restores the original net."""
    net, x, S, cost = setup(2, widths=(6, 8), blocks=1)
    net = net.double()
    implant = {name: [0, 2] for name in S.names if S[name].implantable and S[name].size >= 6}
    plan = Plan({name: GroupPlan(S[name].size, [], implant.get(name, [])) for name in S.names})
    for name, rows in implant.items():
        for conv in S[name].implantable:
            w = net.get_submodule(conv).weight
            with torch.no_grad():
                centre = w[rows, :, 1, 1].clone()
                w[rows] = 0
                w[rows, :, 1, 1] = centre
    calib = [(torch.randn(32, 1, 10, 10, dtype=torch.float64), None)]
    reestimate_batchnorm(net, [torch.randn(64, 1, 10, 10, dtype=torch.float64)])  # statistics of the data, as trained
    lstsq = apply_plan(net, plan, x.double(), structures=S, implant_init="lstsq", calibration=calib)
    assert not any(not w.any() for w in _implant_weights(lstsq).values())
    assert sum(m.num_implanted for m in lstsq.modules() if isinstance(m, ImplantConv2d)) >= 4
    xb = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(lstsq(xb), net(xb), rtol=1e-7, atol=1e-7)


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
def test_permuted_implants_equal_the_scatter_formulation(seed, monkeypatch):
    monkeypatch.setattr("haprune.apply._select_implants", lambda *a: None)  # keep every implant non-zero
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


def test_a_group_of_only_zero_implants_is_refused_unless_the_implants_are_fit():
    net = make_net(0, widths=(4, 6), blocks=1)
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    g = S["layers.0.conv1"]
    plan = Plan.identity(S)
    plan.groups[g.name] = GroupPlan(g.size, remove=[0, 1], implant=[2, 3])
    with pytest.raises(PlanMismatchError, match="keeps no channel, only 2 zero-initialised implants"):
        apply_plan(net, plan, x, structures=S)
    calib = [(torch.randn(32, 1, 10, 10), torch.zeros(32, dtype=torch.long))]
    fitted = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=True)
    imp = fitted.get_submodule(g.name)
    assert isinstance(imp, ImplantConv2d) and imp.main is None and imp.implant.weight.abs().sum() > 0
