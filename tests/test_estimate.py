"""Sensitivity estimators against exact references on small networks."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from haprune.estimate import CalibrationDataError, estimate
from haprune.estimate.curvature import importance_draws
from haprune.graph import build_structures
from nets import make_net


def exact_block_traces(model, structures, x, y):
    """Tr(H_ss) from the full Hessian of the mean cross-entropy w.r.t. the structures' parameters."""
    names = structures.param_names()
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    others = {n: p.detach() for n, p in params.items() if n not in names}
    others.update(dict(model.named_buffers()))

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return F.cross_entropy(functional_call(model, (p, others), (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, flat0)
    diag = torch.split(H.diagonal(), sizes)
    return structures.reduce({n: d.reshape(s) for n, d, s in zip(names, diag, shapes)})


def small_problem(act=nn.ReLU, seed=0):
    net = make_net(seed, torch.float64, widths=(3, 4), blocks=1, classes=3, act=act)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    return net, x, y, build_structures(net, x[:1])


def confident_problem():
    """small_problem(seed=7) with the classifier scaled x30, so that the top class has p ~ 0.65-0.95 as on a
    trained net; and its exact GGN traces."""
    net, x, y, S = small_problem(seed=7)
    with torch.no_grad():
        net.fc.weight.mul_(30)
        net.fc.bias.mul_(30)
    return net, x, y, S, estimate(net, S, [(x, y)], "ggn", progress=False).trace


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ggn_traces_equal_exact_hessian_on_piecewise_linear_nets(seed):
    net, x, y, S = small_problem(seed=seed)
    exact = exact_block_traces(net, S, x, y)
    got = estimate(net, S, [(x[:4], y[:4]), (x[4:], y[4:])], "ggn", progress=False)
    # two batches of unequal size: the estimate must be the mean over all samples
    assert got.info["exact"] is True
    rel = ((got.trace - exact).abs() / exact.abs().clamp_min(1e-300)).max()
    assert rel < 1e-10, rel


def test_ggn_differs_from_hessian_on_gelu_net():
    net, x, y, S = small_problem(act=nn.GELU, seed=0)
    exact = exact_block_traces(net, S, x, y)
    got = estimate(net, S, [(x, y)], "ggn", progress=False)
    assert got.info["exact"] is False
    assert ((got.trace - exact).abs() / exact.abs()).max() > 1e-3


def test_auto_picks_exact_ggn_for_relu_and_fisher_for_gelu():
    net, x, y, S = small_problem()
    s = estimate(net, S, [(x, y)], "auto", progress=False)
    assert s.info["auto"]["chose"] == "ggn" and s.info["exact"]
    net, x, y, S = small_problem(act=nn.GELU)
    s = estimate(net, S, [(x, y)], "auto", progress=False, max_probes=4)
    assert s.info["auto"]["chose"] == "fisher" and s.criterion == "fisher"
    assert "GeluBackward0" in s.info["auto"]["why"] and s.info["auto"]["double_backward"] == "supported"
    # a custom loss leaves only Hutchinson (after the double-backward trial)
    s = estimate(net, S, [(x, y)], "auto", progress=False, max_probes=4,
                 loss_fn=lambda z, t: F.cross_entropy(z, t, label_smoothing=0.1))
    assert s.info["auto"]["chose"] == "hutchinson" and s.info["probes_per_batch"] == [4]


def test_hutchinson_converges_to_exact_block_traces():
    net, x, y, S = small_problem(seed=3)
    exact = exact_block_traces(net, S, x, y)
    s = estimate(net, S, [(x, y)], "hutchinson", progress=False, max_probes=3000, min_probes=3000, seed=1)
    z = (s.trace - exact).abs() / s.stderr
    assert z.max() < 5.0, z.max()  # within 5 standard errors, every structure
    # the reported standard errors are honest, not inflated: z^2 averages about 1 (chi-square, 1 dof)
    assert 0.2 < z.pow(2).mean() < 3.0, z.pow(2).mean()


def test_hutchinson_stops_early_when_converged_and_is_deterministic():
    net, x, y, S = small_problem(seed=4)
    a = estimate(net, S, [(x, y)], "hutchinson", progress=False, max_probes=2000, stop="stderr", tol=3.0, seed=7)
    b = estimate(net, S, [(x, y)], "hutchinson", progress=False, max_probes=2000, stop="stderr", tol=3.0, seed=7)
    assert a.info["probes_per_batch"][0] < 2000
    assert torch.equal(a.scores, b.scores)


def test_hutchinson_rank_rule_stops_when_the_ranking_is_reliable():
    from scipy.stats import spearmanr

    # enough structures for a rank correlation to mean something (a real net has hundreds)
    net = make_net(5, torch.float64, widths=(8, 12), blocks=2, classes=3)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    S = build_structures(net, x[:1])
    exact = estimate(net, S, [(x, y)], "ggn", progress=False)  # exact here (ReLU, eval-mode BatchNorm)
    kw = dict(progress=False, max_probes=600, reliability=0.5, check_every=8, seed=2)
    s = estimate(net, S, [(x, y)], "hutchinson", **kw)
    used, rel = s.info["probes_per_batch"][0], s.info["reliability_per_batch"][0]
    assert S.num_structures >= 40 and s.info["stop"] == "rank"
    assert used < 600 and used % 8 == 0 and rel >= 0.5  # stopped at a check, having reached the target
    # measured on this (random, hard) net: the stopped ranking is informative, though noisy
    assert spearmanr(s.scores.numpy(), exact.scores.numpy())[0] > 0.3
    assert torch.equal(s.scores, estimate(net, S, [(x, y)], "hutchinson", **kw).scores)  # deterministic
    # an unreachable target runs to the cap and says how reliable the ranking got
    s = estimate(net, S, [(x, y)], "hutchinson", **{**kw, "max_probes": 64, "reliability": 0.999})
    assert s.info["probes_per_batch"] == [64] and s.info["reliability_per_batch"][0] < 0.999
    with pytest.raises(ValueError, match="stop must be"):
        estimate(net, S, [(x, y)], "hutchinson", progress=False, stop="never")


def test_split_half_reliability_formula():
    from haprune.estimate.curvature import split_half_reliability

    a = torch.arange(10, dtype=torch.float64)
    one = torch.ones(10, dtype=torch.float64)
    assert split_half_reliability(a, a, one) == pytest.approx(1.0)
    assert split_half_reliability(a, a.flip(0), one) == -1.0
    # Spearman-Brown: r = 0.5 between halves -> 2 * 0.5 / 1.5
    g = torch.Generator().manual_seed(0)
    b = torch.randn(200, generator=g, dtype=torch.float64)
    c = torch.randn(200, generator=g, dtype=torch.float64)
    from scipy.stats import spearmanr

    r = spearmanr(b.numpy(), c.numpy())[0]
    assert split_half_reliability(b, c, torch.ones(200, dtype=torch.float64)) == pytest.approx(2 * r / (1 + r),
                                                                                             rel=1e-9)


def test_vectorised_reduction_matches_a_per_channel_loop():
    net = make_net(0, widths=(5, 7), blocks=2)
    x = torch.randn(1, 1, 8, 8)
    S = build_structures(net, x)
    gen = torch.Generator().manual_seed(0)
    elem = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in net.named_parameters()}
    got = S.split(S.reduce(elem))
    for g in S:
        for c in range(g.size):
            ref = 0.0
            for sl in g.param_slices:
                t = elem[sl.tensor]
                for pos, root in zip(sl.idxs.tolist(), sl.root_idxs.tolist()):
                    if root == c:
                        ref += float(t.select(sl.dim, pos).sum())
            assert math.isclose(float(got[g.name][c]), ref, rel_tol=1e-12, abs_tol=1e-12)


def test_score_rules():
    net, x, y, S = small_problem(seed=5)
    s = estimate(net, S, [(x, y)], "ggn", progress=False)
    wsq = S.reduce({n: p.detach() ** 2 for n, p in net.named_parameters()})
    assert torch.allclose(s.scores, s.trace / S.numel() * wsq)
    o = estimate(net, S, [(x, y)], "ggn", score="obd", progress=False)
    assert (o.scores >= 0).all() and not torch.allclose(o.scores, s.scores)


def test_empirical_fisher_equals_per_sample_loop():
    net, x, y, S = small_problem(seed=6)
    s = estimate(net, S, [(x, y)], "empirical_fisher", progress=False, chunk_size=2)
    names = S.param_names()
    params = dict(net.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), [params[n] for n in names])
        for n, gi in zip(names, g):
            acc[n] += gi ** 2 / len(x)
    assert torch.allclose(s.trace, S.reduce(acc), rtol=1e-10)


@pytest.mark.parametrize("sampling, tol", [("multinomial", 0.15), ("importance", 0.03)])
def test_sampled_fisher_is_close_to_ggn_with_many_samples(sampling, tol):
    net, x, y, S = small_problem(seed=7)
    g = estimate(net, S, [(x, y)], "ggn", progress=False)
    f = estimate(net, S, [(x, y)], "fisher", progress=False, samples_per_input=400, sampling=sampling)
    assert f.info["sampling"] == sampling
    assert ((f.trace - g.trace).abs() / g.trace).median() < tol


@pytest.mark.parametrize("parts", [1, 4])
def test_importance_draws_are_unbiased_for_any_per_pair_quantity(parts):
    # sum over drawn pairs of weight * f(n, k) must average to sum_nk p_nk f(n, k) for any f >= 0. The test's f
    # is ||p_n - e_k||^2 times a random factor in [0.5, 1.5], as a squared gradient J^T (p_n - e_k) is: with f
    # unrelated to the proposal the estimate stays unbiased but too noisy for 4000 runs to show it.
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(5, 4, generator=gen, dtype=torch.float64), -1)
    logit_sq = ((probs[:, None, :] - torch.eye(4, dtype=torch.float64)[None]) ** 2).sum(-1)
    f = logit_sq * (0.5 + torch.rand(5, 4, generator=gen, dtype=torch.float64))
    truth = (probs * f).sum()
    for draws in (1, 3, 8) if parts == 1 else (4, 9):
        total = 0.0
        runs = 4000
        for seed in range(runs):
            rows, labels, w = importance_draws(probs, draws, torch.Generator().manual_seed(seed), parts)
            assert len(set(zip(rows.tolist(), labels.tolist()))) == len(rows) <= draws  # distinct pairs
            assert (w >= 0).all() and (w.sum(0) > 0).all()
            total += float((w * f[rows, labels]).sum())
        assert abs(total / runs - truth) / truth < 0.03, (draws, total / runs, truth)


def test_importance_draws_with_certain_predictions_draw_nothing():
    rows, labels, w = importance_draws(torch.eye(3, dtype=torch.float64), 4, torch.Generator().manual_seed(0))
    assert len(rows) == len(labels) == 0 and w.shape == (1, 0)


def test_importance_fisher_beats_multinomial_at_equal_draws():
    # the point of importance sampling: on a confident net one draw per input lands much closer to the exact GGN.
    # (With near-uniform predictions, as at initialisation, the two are about equal; not what calibration sees.)
    net, x, y, S, exact = confident_problem()

    def err(sampling):
        return statistics.fmean(
            float(((estimate(net, S, [(x, y)], "fisher", progress=False, seed=s, sampling=sampling).trace - exact)
                   .abs() / exact).median()) for s in range(20))

    assert err("importance") < 0.25 * err("multinomial")


def test_fisher_options_are_checked():
    net, x, y, S = small_problem(seed=7)
    with pytest.raises(ValueError, match="whole number"):
        estimate(net, S, [(x, y)], "fisher", progress=False, sampling="multinomial", samples_per_input=0.5)
    with pytest.raises(ValueError, match="sampling must be"):
        estimate(net, S, [(x, y)], "fisher", progress=False, sampling="stratified")
    half = estimate(net, S, [(x, y)], "fisher", progress=False, samples_per_input=0.5)
    assert half.info["gradients"] <= 3 and torch.isfinite(half.trace).all()


@pytest.mark.parametrize("crit", ["l1", "l2", "taylor", "random", "fisher"])
def test_other_criteria_shapes_and_determinism(crit):
    net, x, y, S = small_problem(seed=8)
    a = estimate(net, S, [(x, y)], crit, progress=False, seed=3)
    b = estimate(net, S, [(x, y)], crit, progress=False, seed=3)
    assert a.scores.shape == (S.num_structures,) and torch.isfinite(a.scores).all()
    assert torch.equal(a.scores, b.scores)


def test_magnitude_values():
    net, x, y, S = small_problem(seed=9)
    l1 = estimate(net, S, [(x, y)], "l1", progress=False)
    assert torch.allclose(l1.scores, S.reduce({n: p.detach().abs() for n, p in net.named_parameters()}))


def test_bad_calibration_data_is_refused_clearly():
    net, x, y, S = small_problem()
    with pytest.raises(CalibrationDataError, match="no calibration batches"):
        estimate(net, S, [], "ggn", progress=False)
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationDataError, match="NaN"):
        estimate(net, S, [(xn, y)], "hutchinson", progress=False)
    with pytest.raises(ValueError, match="unknown criterion"):
        estimate(net, S, [(x, y)], "magic", progress=False)


def test_model_is_not_modified_and_mode_restored():
    net, x, y, S = small_problem()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    estimate(net, S, [(x, y)], "hutchinson", progress=False, max_probes=3)
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_auto_ignores_hutchinson_options_when_it_chooses_ggn():
    net, x, y, S = small_problem()
    s = estimate(net, S, [(x, y)], "auto", progress=False, max_probes=5, tol=0.1)
    assert s.info["auto"]["chose"] == "ggn" and s.info["exact"]


class _Branchy(nn.Module):
    """A net whose forward branches on data (as Hugging Face models do): torch.func.vmap cannot trace it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if bool((x.abs().sum() >= 0).item()):
            return self.net(x)
        return -self.net(x)


@pytest.mark.parametrize("criterion", ["ggn", "fisher"])
def test_per_sample_gradients_fall_back_to_a_loop_where_vmap_cannot_trace(criterion):
    net, x, y, S = small_problem(seed=6)
    wrapped = _Branchy(net)
    S2 = build_structures(wrapped, x[:1])
    a = estimate(net, S, [(x, y)], criterion, progress=False, seed=3)
    b = estimate(wrapped, S2, [(x, y)], criterion, progress=False, seed=3)
    assert torch.allclose(a.trace, b.trace, rtol=1e-10, atol=0)


def test_importance_draws_parts_each_carry_an_equal_share():
    # each part's draws are weighted 1 / (parts * its size) times p / pi, so per part sum(w * pi / p) = 1 / parts
    probs = torch.softmax(3 * torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    logit_sq = ((probs[:, None, :] - torch.eye(5, dtype=torch.float64)[None]) ** 2).sum(-1)
    pi = probs * logit_sq / (probs * logit_sq).sum()
    for seed in range(10):
        rows, labels, w = importance_draws(probs, 22, torch.Generator().manual_seed(seed), parts=4)
        assert w.shape == (4, len(rows))
        share = (w * pi[rows, labels] / probs[rows, labels]).sum(1)
        assert torch.allclose(share, torch.full((4,), 0.25, dtype=torch.float64), rtol=1e-12), share


def test_importance_fisher_standard_errors_are_honest():
    # z = (estimate - exact GGN trace) / stderr over seeds: mean z^2 near 1 if the random-group errors are honest
    net, x, y, S, exact = confident_problem()
    z2 = []
    for s in range(30):
        f = estimate(net, S, [(x, y)], "fisher", progress=False, seed=s, samples_per_input=8)
        assert f.info["stderr_groups"] == 8 and f.stderr.shape == exact.shape
        z2.append(((f.trace - exact) / f.stderr).pow(2))
    mean_z2 = torch.stack(z2).mean()
    assert 0.3 < mean_z2 < 3.0, mean_z2
    assert estimate(net, S, [(x, y)], "fisher", progress=False, sampling="multinomial").stderr is None
