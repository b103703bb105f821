"""Compensation: exact least-squares refits (float64), shapes unchanged, identity where nothing goes, clear errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haprune.apply import (CompensationError, ImplantConv2d, UndeterminedFitError, apply_plan, channel_maps,
                           compensate)
from haprune.graph import build_structures
from haprune.plan import CostModel, GroupPlan, Plan, make_plan
from nets import make_net


def _lstsq(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form float64 least squares with an intercept: y ~ x W^T + b."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution
    return sol[:-1].T, sol[-1]


class MLP(nn.Module):
    def __init__(self, d=6, h=5, o=3):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, o)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _pruned_mlp(dense: MLP, keep: list[int]) -> MLP:
    p = MLP(dense.fc1.in_features, len(keep), dense.fc2.out_features).double()
    with torch.no_grad():
        p.fc1.weight.copy_(dense.fc1.weight[keep]); p.fc1.bias.copy_(dense.fc1.bias[keep])
        p.fc2.weight.copy_(dense.fc2.weight[:, keep]); p.fc2.bias.copy_(dense.fc2.bias)
    return p


def test_linear_consumer_equals_closed_form_least_squares():
    torch.manual_seed(0)
    dense = MLP().double()
    keep = [0, 2, 4]
    pruned = _pruned_mlp(dense, keep)
    x = torch.randn(64, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    res = compensate(dense, pruned, [(x[:40], None), (x[40:], None)], ridge=0.0)
    assert res.layers == ["fc2"]
    h = torch.relu(dense.fc1(x))[:, keep]
    w, b = _lstsq(h, dense.fc2(torch.relu(dense.fc1(x))).detach())
    torch.testing.assert_close(pruned.fc2.weight.detach(), w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pruned.fc2.bias.detach(), b, rtol=1e-9, atol=1e-9)
    assert res.error_after["fc2"] <= res.error_before["fc2"]
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # dense untouched


class ConvNet(nn.Module):
    def __init__(self, c0=2, c1=5, c2=4, stride=2, k=3, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c0, c1, 3, 1, 1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, k, stride, k // 2, bias=bias)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x):
        return self.bn(self.conv2(self.act(self.conv1(x))))


@pytest.mark.parametrize("k,stride,bias", [(3, 2, False), (1, 1, False), (3, 1, True)])
def test_conv_consumer_equals_closed_form_and_intercept_goes_to_bias_or_batchnorm(k, stride, bias):
    torch.manual_seed(1)
    dense = ConvNet(k=k, stride=stride, bias=bias).double().eval()
    with torch.no_grad():
        dense.bn.running_mean.uniform_(-1, 1); dense.bn.running_var.uniform_(0.5, 2)
    keep = [1, 3, 4]
    pruned = copy.deepcopy(dense)
    pruned.conv1 = nn.Conv2d(2, 3, 3, 1, 1).double()
    pruned.conv2 = nn.Conv2d(3, 4, k, stride, k // 2, bias=bias).double()
    with torch.no_grad():
        pruned.conv1.weight.copy_(dense.conv1.weight[keep]); pruned.conv1.bias.copy_(dense.conv1.bias[keep])
        pruned.conv2.weight.copy_(dense.conv2.weight[:, keep])
        if bias:
            pruned.conv2.bias.copy_(dense.conv2.bias)
    x = torch.randn(12, 2, 7, 7, dtype=torch.float64)
    res = compensate(dense, pruned, [(x, None)], ridge=0.0)
    h = torch.relu(dense.conv1(x))[:, keep]
    cols = F.unfold(h, k, padding=k // 2, stride=stride).transpose(1, 2).reshape(-1, 3 * k * k)
    y = dense.conv2(torch.relu(dense.conv1(x))).detach().permute(0, 2, 3, 1).reshape(-1, 4)
    w, b = _lstsq(cols, y)
    torch.testing.assert_close(pruned.conv2.weight.detach().reshape(4, -1), w, rtol=1e-8, atol=1e-9)
    if bias:
        torch.testing.assert_close(pruned.conv2.bias.detach(), b, rtol=1e-8, atol=1e-9)
        assert res.bn_folded == []
    else:
        assert pruned.conv2.bias is None and res.bn_folded == ["conv2"]
        torch.testing.assert_close(pruned.bn.running_mean, dense.bn.running_mean - b, rtol=1e-8, atol=1e-9)
    # the compensated model reproduces the pre-BatchNorm output as well as least squares can
    with torch.no_grad():
        fitted = (cols @ w.T + b).reshape(12, *dense.conv2(h.new_zeros(1, 5, 7, 7)).shape[2:], 4).permute(0, 3, 1, 2)
        torch.testing.assert_close(pruned(x), dense.bn(fitted), rtol=1e-8, atol=1e-8)
    assert res.bias_added == []


def test_layer_without_bias_or_batchnorm_gets_a_bias_and_says_so():
    torch.manual_seed(2)
    dense = MLP().double()
    dense.fc2 = nn.Linear(5, 3, bias=False).double()
    pruned = _pruned_mlp(MLP().double(), [0, 1])
    pruned.fc1 = nn.Linear(6, 2).double()
    with torch.no_grad():
        pruned.fc1.weight.copy_(dense.fc1.weight[[0, 1]]); pruned.fc1.bias.copy_(dense.fc1.bias[[0, 1]])
    pruned.fc2 = nn.Linear(2, 3, bias=False).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    res = compensate(dense, pruned, [(x, None)], ridge=0.0)
    assert res.bias_added == ["fc2"] and pruned.fc2.bias is not None
    w, b = _lstsq(torch.relu(dense.fc1(x))[:, [0, 1]], dense.fc2(torch.relu(dense.fc1(x))).detach())
    torch.testing.assert_close(pruned.fc2.bias.detach(), b, rtol=1e-9, atol=1e-9)


def test_refitting_an_unpruned_model_leaves_its_outputs_unchanged():
    net = make_net(3, widths=(4, 6), blocks=2).double().eval()
    copy_ = copy.deepcopy(net)
    x = torch.randn(16, 1, 10, 10, dtype=torch.float64)
    res = compensate(net, copy_, [(x, None)], layers="all", ridge=0.0)
    assert len(res.layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    xt = torch.randn(5, 1, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(copy_(xt), net(xt), rtol=1e-6, atol=1e-6)
    assert max(res.error_after.values()) < 1e-12


def test_identity_plan_with_compensation_leaves_the_model_unchanged():
    net = make_net(0, widths=(4, 6), blocks=2)
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    calib = [(torch.randn(8, 1, 10, 10), torch.zeros(8, dtype=torch.long))]
    pruned = apply_plan(net, Plan.identity(S), x, structures=S, calibration=calib, compensate=True)
    xt = torch.randn(4, 1, 10, 10)
    assert torch.equal(pruned(xt), net(xt))
    assert pruned.haprune_compensation["layers"] == [] and pruned.haprune_compensation["mode"] == "sequential"


def _snapshot(m: nn.Module):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 500), target=st.sampled_from([0.3, 0.5]), implant=st.sampled_from([0.0, 0.3]),
       mode=st.sampled_from(["sequential", "dense-inputs"]), train=st.booleans())
def test_compensation_keeps_shapes_dense_untouched_and_never_raises_layer_error(seed, target, implant, mode, train):
    torch.manual_seed(seed)
    net = make_net(seed, widths=(4, 8), blocks=2)
    net.train(train)
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    scores = torch.rand(S.num_structures, dtype=torch.float64)
    plan = make_plan(S, scores, CostModel(net, S, x), target, implant_ratio=implant, tolerance=0.05)
    calib = [(torch.randn(16, 1, 10, 10), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    before = _snapshot(net)
    plain = apply_plan(net, plan, x, structures=S, implant_init="lstsq", calibration=calib)
    comp = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=mode)
    after = _snapshot(net)
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items()) and before[1] == after[1]
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in comp.state_dict().items() if k in shapes} == shapes
    assert [m.training for m in comp.modules()] == [m.training for m in plain.modules()]
    info = comp.haprune_compensation
    for n in info["layers"]:  # least squares never does worse than the layer it replaces on the same rows
        if mode == "sequential":
            assert info["error_after"][n] <= info["error_before"][n] + 1e-6
    comp.eval()
    assert torch.isfinite(comp(torch.randn(3, 1, 10, 10))).all()


def test_compensation_reduces_the_output_error_of_a_pruned_net():
    torch.manual_seed(0)
    net = make_net(5, widths=(6, 8), blocks=2).eval()
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    plan = make_plan(S, torch.rand(S.num_structures, dtype=torch.float64), CostModel(net, S, x), 0.4,
                     tolerance=0.05)
    calib = [(torch.randn(64, 1, 10, 10), torch.zeros(64, dtype=torch.long))]
    plain = apply_plan(net, plan, x, structures=S).eval()
    comp = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=True).eval()
    xt = calib[0][0]
    with torch.no_grad():
        ref = net(xt)
        assert (comp(xt) - ref).pow(2).sum() < (plain(xt) - ref).pow(2).sum()


def test_channel_maps_follow_the_plan_including_implant_order():
    net = make_net(0, widths=(4, 6), blocks=1)
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    g = S["layers.0.conv1"]
    plan = Plan.identity(S)
    plan.groups[g.name] = GroupPlan(g.size, remove=[0], implant=[1])
    ins, outs = channel_maps(net, [(g, plan.groups[g.name])])
    assert outs["layers.0.conv1"] == [2, 3, 1]
    assert ins["layers.0.conv2"] == [2, 3, 1]
    pruned = apply_plan(net, plan, x, structures=S)
    conv = pruned.get_submodule("layers.0.conv1")
    assert isinstance(conv, ImplantConv2d)
    torch.testing.assert_close(pruned.get_submodule("layers.0.conv2").weight,
                               net.get_submodule("layers.0.conv2").weight[:, [2, 3, 1]])


def test_undetermined_fit_names_the_layer():
    torch.manual_seed(0)
    dense = MLP(d=6, h=8).double()
    pruned = _pruned_mlp(dense, [0, 1, 2, 3, 4, 5])
    with pytest.raises(UndeterminedFitError, match="fc2.*calibration rows|calibration rows.*fc2|'fc2'"):
        compensate(dense, pruned, [(torch.randn(4, 6, dtype=torch.float64), None)])


def test_bad_inputs_are_refused_before_any_pass():
    dense = MLP().double()
    pruned = _pruned_mlp(dense, [0, 1])
    with pytest.raises(CompensationError, match="no calibration data"):
        compensate(dense, pruned, [])
    other = nn.Sequential(nn.Linear(6, 2), nn.ReLU(), nn.Linear(2, 3)).double()
    with pytest.raises(CompensationError, match="no same-named module"):
        compensate(dense, other, [(torch.randn(8, 6, dtype=torch.float64), None)])
    with pytest.raises(ValueError, match="mode"):
        compensate(dense, pruned, [(torch.randn(8, 6), None)], mode="magic")
    with pytest.raises(CompensationError, match="kept_inputs"):
        compensate(dense, pruned, [(torch.randn(8, 6, dtype=torch.float64), None)], mode="dense-inputs")
    net = make_net(0, widths=(4, 6), blocks=1)
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    with pytest.raises(ValueError, match="needs calibration"):
        apply_plan(net, Plan.identity(S), x, structures=S, compensate=True)


def test_dense_inputs_mode_fits_on_the_dense_activations_of_the_kept_channels():
    torch.manual_seed(4)
    dense = MLP(d=6, h=6, o=3).double()
    keep = [5, 1, 3]
    pruned = _pruned_mlp(dense, keep)
    with torch.no_grad():
        pruned.fc1.weight.add_(0.3)  # upstream error that dense-inputs does not see (sequential would)
    x = torch.randn(50, 6, dtype=torch.float64)
    compensate(dense, pruned, [(x, None)], mode="dense-inputs", kept_inputs={"fc2": keep}, ridge=0.0)
    h = torch.relu(dense.fc1(x)).detach()
    w, b = _lstsq(h[:, keep], dense.fc2(h).detach())
    torch.testing.assert_close(pruned.fc2.weight.detach(), w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pruned.fc2.bias.detach(), b, rtol=1e-9, atol=1e-9)


def test_implant_rows_fit_on_the_centre_tap_and_feed_the_consumer():
    torch.manual_seed(0)
    net = make_net(1, widths=(6, 6), blocks=1).double().eval()
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    S = build_structures(net, x)
    g = S["layers.0.conv1"]
    plan = Plan.identity(S)
    plan.groups[g.name] = GroupPlan(g.size, remove=[0, 1], implant=[2])
    calib = [(torch.randn(40, 1, 10, 10, dtype=torch.float64), torch.zeros(40, dtype=torch.long))]
    pruned = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=True,
                        compensate_options={"ridge": 0.0})
    info = pruned.haprune_compensation
    assert info["implants_fit"] == ["layers.0.conv1"]
    assert info["layers"][:2] == ["layers.0.conv1", "layers.0.conv2"]  # then the layers downstream of the change
    assert "stem" not in info["layers"]  # its input is the dense one: not refit
    imp = pruned.get_submodule("layers.0.conv1")
    # the implant row is the least-squares 1x1 fit of the dense channel 2 on the (unchanged) block input
    feats = {}
    h = net.get_submodule("layers.0.conv1").register_forward_hook(lambda m, i, o: feats.update(x=i[0], y=o))
    net(calib[0][0]); h.remove()
    xin = feats["x"].permute(0, 2, 3, 1).reshape(-1, 6)
    w, b = _lstsq(xin, feats["y"][:, [2]].permute(0, 2, 3, 1).reshape(-1, 1).detach())
    torch.testing.assert_close(imp.implant.weight.detach().reshape(1, 6), w, rtol=1e-7, atol=1e-9)


def test_default_refits_downstream_layers_and_changed_only_the_narrowed_ones():
    torch.manual_seed(0)
    net = make_net(2, widths=(4, 6), blocks=2).eval()
    x = torch.randn(1, 1, 10, 10)
    S = build_structures(net, x)
    g = S["layers.0.conv1"]
    plan = Plan.identity(S)
    plan.groups[g.name] = GroupPlan(g.size, remove=[0, 1])
    calib = [(torch.randn(48, 1, 10, 10), torch.zeros(48, dtype=torch.long))]
    default = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=True).haprune_compensation
    changed = apply_plan(net, plan, x, structures=S, calibration=calib, compensate=True,
                         compensate_options={"layers": "changed"}).haprune_compensation
    assert changed["layers"] == ["layers.0.conv2"]
    order = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    downstream = order[order.index("layers.0.conv2"):]
    assert default["layers"] == [n for n in downstream if n in default["layers"]]
    assert {"layers.0.conv2", "layers.1.conv1", "fc"} <= set(default["layers"])
    assert "stem" not in default["layers"] and "layers.0.conv1" not in default["layers"]
    with pytest.raises(ValueError, match="layers must be"):
        compensate(net, copy.deepcopy(net), calib, layers="some")


def test_an_undetermined_optional_refit_is_skipped_and_recorded_a_required_one_raises():
    """Downstream layers whose input width is unchanged are refit only where the calibration data determines them:
    here fc2 (narrowed to 2 inputs) is required and refit; fc3 (12 unnarrowed inputs, 6 rows) keeps its weights
    and the result says why."""
    torch.manual_seed(1)
    dense = nn.Sequential()
    dense.fc1, dense.act, dense.fc2, dense.act2, dense.fc3 = (nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 12),
                                                             nn.ReLU(), nn.Linear(12, 3))
    dense = dense.double()
    pruned = copy.deepcopy(dense)
    keep = [0, 3]
    with torch.no_grad():
        pruned.fc1 = nn.Linear(4, 2).double()
        pruned.fc1.weight.copy_(dense.fc1.weight[keep]); pruned.fc1.bias.copy_(dense.fc1.bias[keep])
        pruned.fc2 = nn.Linear(2, 12).double()
        pruned.fc2.weight.copy_(dense.fc2.weight[:, keep]); pruned.fc2.bias.copy_(dense.fc2.bias)
    fc3_before = pruned.fc3.weight.clone()
    result = compensate(dense, pruned, [(torch.randn(6, 4, dtype=torch.float64), None)])
    assert "fc2" in result.layers and "fc3" not in result.layers
    assert "fc3" in result.skipped and "12 regressors" in result.skipped["fc3"]
    assert torch.equal(pruned.fc3.weight, fc3_before)


def test_calibration_requirements_count_rows_per_sample_and_regressors():
    """A conv's rows per sample are its output positions, its regressors input channels x taps; a linear layer on
    (batch, tokens, features) has one row per token; ``samples`` is ceil((regressors + 1) / rows)."""
    from haprune.apply import calibration_requirements, samples_needed

    net = nn.Sequential()
    net.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    net.flat = nn.Flatten(2)  # (B, 8, 25): 25 "tokens" of 8 features after the transpose below
    net.t = nn.Identity()
    net.fc = nn.Linear(25, 4)
    needs = calibration_requirements(net, torch.randn(5, 3, 10, 10))
    assert needs["conv"].rows_per_sample == 25 and needs["conv"].regressors == 27
    assert needs["fc"].rows_per_sample == 8 and needs["fc"].regressors == 25
    assert needs["conv"].samples() == 2 and needs["fc"].samples() == 4 and needs["fc"].samples(7) == 1
    assert samples_needed(needs) == (4, "fc")
    assert samples_needed({}) == (0, None)
    assert list(calibration_requirements(net, torch.randn(1, 3, 10, 10), layers=["fc"])) == ["fc"]


def test_a_required_refit_the_data_cannot_determine_fails_before_the_calibration_pass():
    """fc2 narrowed to 6 inputs needs 7 samples: with 4 compensate raises at once, naming the layer and how many
    samples to pass, and the dense model never sees the calibration batch."""
    torch.manual_seed(0)
    dense = MLP(d=6, h=8).double()
    pruned = _pruned_mlp(dense, [0, 1, 2, 3, 4, 5])
    sizes = []
    dense.register_forward_pre_hook(lambda m, i: sizes.append(len(i[0])))
    with pytest.raises(UndeterminedFitError, match=r"4 calibration samples.*'fc2'.*at least 7"):
        compensate(dense, pruned, [(torch.randn(4, 6, dtype=torch.float64), None)])
    assert 4 not in sizes
    result = compensate(dense, pruned, [(torch.randn(7, 6, dtype=torch.float64), None)])
    assert result.layers == ["fc2"]
