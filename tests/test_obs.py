"""Structured OBS saliency against brute force: refit the consumer without the channel, measure the error."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haprune.estimate.curvature import ggn
from haprune.estimate.obs import consumers, obs_saliency, output_curvature, patches
from haprune.graph import build_structures
from nets import make_net


def _inputs(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    got = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: got.update(x=i[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["x"]


def _sse_without(xr: torch.Tensor, y: torch.Tensor, drop: list[int]) -> float:
    """Least-squares (with intercept) error of y on the columns of xr other than ``drop``."""
    keep = [j for j in range(xr.shape[1]) if j not in set(drop)]
    a = torch.cat([xr[:, keep], torch.ones(len(xr), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution
    return float((y - a @ sol).pow(2).sum())


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), k=st.sampled_from([1, 3]))
def test_obs_equals_brute_force_refit_without_each_channel(seed, k):
    torch.manual_seed(seed)
    net = make_net(seed, widths=(3, 4), blocks=1, k=k).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    S = build_structures(net, x)
    calib = [(torch.randn(24, 1, 8, 8, dtype=torch.float64), torch.zeros(24, dtype=torch.long))]
    scores = S.split(obs_saliency(net, S, calib, ridge=0.0))
    checked = 0
    for g in S:
        expect = torch.zeros(g.size, dtype=torch.float64)
        for name, positions, channels in consumers(net, g):
            m = net.get_submodule(name)
            xin = _inputs(net, name, calib[0][0])
            xr = xin.reshape(-1, xin.shape[-1]) if isinstance(m, nn.Linear) else patches(xin, m)
            w = m.weight.detach().reshape(m.weight.shape[0], -1)
            y = xr @ w.T  # the layer's own output (bias aside): the dense layer reproduces it exactly
            taps = 1 if isinstance(m, nn.Linear) else m.kernel_size[0] * m.kernel_size[1]
            for c in range(g.size):
                cols = [p * taps + t for p, r in zip(positions.tolist(), channels.tolist()) if r == c
                        for t in range(taps)]
                expect[c] += _sse_without(xr, y, cols)
            checked += 1
        torch.testing.assert_close(scores[g.name], expect, rtol=1e-4, atol=1e-8 * float(expect.abs().max()))
    assert checked >= len(S)


def test_output_weights_weight_each_output_row():
    torch.manual_seed(0)
    net = make_net(2, widths=(3, 4), blocks=1).double().eval()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    S = build_structures(net, x)
    calib = [(torch.randn(20, 1, 8, 8, dtype=torch.float64), torch.zeros(20, dtype=torch.long))]
    names = {n for g in S for n, _, _ in consumers(net, g)}
    out_rows = {n: net.get_submodule(n).weight.shape[0] for n in names}
    plain = obs_saliency(net, S, calib, ridge=1e-6)
    twos = obs_saliency(net, S, calib, ridge=1e-6, output_weights={n: torch.full((r,), 2.0) for n, r in out_rows.items()})
    torch.testing.assert_close(twos, plain)  # 1/2 * 2 * delta
    # one-hot weights pick out each output row: summing the row contributions gives the plain score back
    total = torch.zeros_like(plain)
    for n, r in out_rows.items():
        for o in range(r):
            w = {m: torch.zeros(rr, dtype=torch.float64) for m, rr in out_rows.items()}
            w[n][o] = 2.0
            total += obs_saliency(net, S, calib, ridge=1e-6, output_weights=w)
    torch.testing.assert_close(total, plain)
    with pytest.raises(ValueError, match="no entry"):
        obs_saliency(net, S, calib, output_weights={})


def test_output_curvature_is_positive_and_scales_with_the_ggn():
    torch.manual_seed(0)
    net = make_net(0, widths=(3, 4), blocks=1).eval()
    x = torch.randn(1, 1, 8, 8)
    S = build_structures(net, x)
    calib = [(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))]
    diag = ggn(net, S, calib, progress=False)["diag"]
    h = output_curvature(net, S, diag, calib)
    assert h and all(bool((v >= 0).all()) and v.shape == (net.get_submodule(n).weight.shape[0],) for n, v in h.items())
    h2 = output_curvature(net, S, {k: 3 * v for k, v in diag.items()}, calib)
    for n in h:
        torch.testing.assert_close(h2[n], 3 * h[n])


def test_patches_equal_unfold():
    torch.manual_seed(0)
    for k, s, p, d in [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2), (5, 2, 2, 1)]:
        conv = nn.Conv2d(3, 2, k, s, p, dilation=d)
        x = torch.randn(2, 3, 9, 7)
        ref = F.unfold(x, k, dilation=d, padding=p, stride=s).transpose(1, 2).reshape(-1, 3 * k * k)
        torch.testing.assert_close(patches(x, conv), ref.double())


def test_obs_needs_batches():
    net = make_net(0, widths=(3, 4), blocks=1)
    S = build_structures(net, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="calibration batches"):
        obs_saliency(net, S, [])


def test_estimate_serves_obs_and_obs_ggn():
    """``estimate(..., "obs")`` / ``"obs-ggn"`` are the registered criteria: the same scores as the direct calls,
    after the shared checks (a NaN weight is refused before any pass)."""
    from haprune.estimate import ModelCheckError, estimate
    from haprune.estimate.obs import consumer_grams

    net = make_net(3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))]
    structures = build_structures(net, batches[0][0][:1])
    direct = obs_saliency(net, structures, batches)
    torch.testing.assert_close(estimate(net, structures, batches, "obs", progress=False).scores, direct)
    diag = ggn(net, structures, batches, progress=False)["diag"]
    grams = consumer_grams(net, structures, batches)
    weights = output_curvature(net, structures, diag, batches, grams=grams)
    expected = obs_saliency(net, structures, batches, output_weights=weights, grams=grams)
    torch.testing.assert_close(estimate(net, structures, batches, "obs-ggn", progress=False).scores, expected)
    with torch.no_grad():
        net.layers[0].conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelCheckError, match="conv2.weight"):
        estimate(net, structures, batches, "obs", progress=False)
