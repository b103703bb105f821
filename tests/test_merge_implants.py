"""merge_implants: the one-conv deployment form of implanted layers computes the same function."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from haprune import merge_implants
from haprune.apply import ImplantConv2d, apply_plan
from haprune.apply.implant import make_implant
from haprune.graph import build_structures
from haprune.io import export_onnx, onnx_matches
from haprune.plan import CostModel, make_plan
from nets import make_net


def _randomise_implants(model: nn.Module, gen: torch.Generator) -> None:
    """Non-zero implant weights and biases (zero implants would hide a misplaced tap)."""
    for m in model.modules():
        if isinstance(m, ImplantConv2d):
            for p in m.implant.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _implanted(seed, widths, blocks, k, kind, implant, target=0.4):
    net = make_net(seed, widths=widths, blocks=blocks, classes=3, k=k, stem_bias=bool(seed % 2))
    x = torch.randn(1, 1, 9, 9)
    S = build_structures(net, x)
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plan = make_plan(S, scores, CostModel(net, S, x), target, implant_ratio=implant, implant_kind=kind,
                     tolerance=0.15)
    model = apply_plan(net, plan, x, structures=S)
    _randomise_implants(model, torch.Generator().manual_seed(seed + 1))
    return model


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), widths=st.lists(st.integers(3, 9), min_size=1, max_size=3),
       blocks=st.integers(1, 2), k=st.sampled_from([3, 5]), kind=st.sampled_from(["1x1", "separable"]),
       implant=st.sampled_from([0.25, 0.5, 1.0]))
def test_merged_model_equals_the_implanted_model_on_random_residual_cnns(seed, widths, blocks, k, kind, implant):
    try:
        model = _implanted(seed, tuple(widths), blocks, k, kind, implant)
    except ValueError:  # tiny nets: target out of reach, refused with a message
        event("plan refused")
        return
    merged = merge_implants(model)
    before = sum(isinstance(m, ImplantConv2d) for m in model.modules())
    after = sum(isinstance(m, ImplantConv2d) for m in merged.modules())
    event(f"merged {before - after} of {before}")
    if kind == "1x1":  # every layer with a kept k x k part merges; fully implanted layers stay a 1 x 1 conv
        assert after == sum(isinstance(m, ImplantConv2d) and m.main is None for m in model.modules())
    xb = torch.randn(4, 1, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(merged(xb), model(xb), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, ImplantConv2d) for m in model.modules()) == before  # the input is not modified


def _conv(k=3, stride=1, bias=False, out=6):
    torch.manual_seed(0)
    return nn.Conv2d(4, out, k, stride, k // 2, bias=bias)


def _check_one_layer(conv: nn.Conv2d, m: int, kind: str, merges: bool) -> None:
    layer = make_implant(conv, m, kind)
    _randomise_implants(nn.Sequential(layer), torch.Generator().manual_seed(3))
    merged = merge_implants(nn.Sequential(layer))[0]
    assert isinstance(merged, nn.Conv2d) == merges
    x = torch.randn(2, 4, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_1x1_implants_merge_at_every_stride_and_kernel_and_keep_their_bias():
    for k in (3, 5, 7):
        for stride in (1, 2, 3):
            for bias in (False, True):
                _check_one_layer(_conv(k, stride, bias), 2, "1x1", merges=True)


def test_separable_implants_merge_only_at_stride_1():
    _check_one_layer(_conv(3, 1), 3, "separable", merges=True)
    _check_one_layer(_conv(5, 1, bias=True), 3, "separable", merges=True)
    _check_one_layer(_conv(3, 2), 3, "separable", merges=False)  # depthwise on the strided grid: not one conv


def test_a_fully_implanted_layer_stays_as_it_is():
    _check_one_layer(_conv(3, 1, out=2), 2, "1x1", merges=False)  # every channel implanted: already one 1x1 conv


def test_merged_model_exports_to_onnx_and_matches(tmp_path):
    model = _implanted(3, (6, 8), 1, 3, "1x1", 0.5)
    merged = merge_implants(model)
    assert not any(isinstance(m, ImplantConv2d) and m.main is not None for m in merged.modules())
    path = export_onnx(merged, torch.randn(1, 1, 9, 9), tmp_path / "m.onnx")
    assert onnx_matches(merged, path, torch.randn(5, 1, 9, 9)) < 1e-5
