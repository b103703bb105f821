"""Latency tables and latency-budget plans: exact on analytic timers, knapsack behaviour, errors, JSON."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from haprune.apply import apply_plan
from haprune.graph import build_structures
from haprune.latency import LatencyTable, LayerTimes, layer_widths, measure_latency_table
from haprune.plan import BudgetError, CostModel, make_plan
from haprune.report import count_flops
from nets import make_net
from zoo import make

X = torch.randn(1, 1, 12, 12)
NET = make_net(0, widths=(16, 24, 32), blocks=2, classes=5)
S = build_structures(NET, X)


def macs(layer: nn.Module, x: torch.Tensor) -> float:
    """An analytic timer: the layer's multiply-accumulates on ``x`` (per sample)."""
    with torch.no_grad():
        y = layer(x)
    if isinstance(layer, nn.Linear):
        return float(layer.weight.numel() * (y.numel() // y.shape[-1]) / x.shape[0])
    return float(layer.weight.numel() * y.shape[2:].numel())


TABLE = measure_latency_table(NET, S, X, step=4, timer=macs)
COST = CostModel(NET, S, X, latency=TABLE)


def test_table_times_every_coupled_layer_once_per_shape():
    assert set(TABLE.layers) == set(layer_widths(NET))  # every conv and the classifier follow some group
    assert TABLE.meta["distinct_shapes"] < len(TABLE.layers)  # blocks of equal shape share a measurement
    for name, lt in TABLE.layers.items():
        full_in, full_out = layer_widths(NET)[name]
        assert lt.in_widths[-1] == full_in and lt.out_widths[-1] == full_out
        assert all(w % 4 == 0 or w in (1, full_in, full_out) for w in lt.in_widths + lt.out_widths)
    assert TABLE.layers["stem"].in_widths == [1]  # the image channels are no group: one width


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_predicted_latency_of_an_analytic_table_is_exact_at_any_widths(seed):
    # MACs are bilinear in (in, out) channels, so interpolating the grid is exact between its points too
    g = torch.Generator().manual_seed(seed)
    alive = [int(torch.randint(1, grp.size + 1, (1,), generator=g)) for grp in S]
    assert COST.latency_ms(alive) == pytest.approx(COST.count(alive)[1], rel=1e-9)


def test_latency_plan_meets_target_and_matches_the_pruned_model():
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = make_plan(S, scores, COST, 0.4, budget="latency", round_to=4)
    assert abs(plan.achieved["latency_removed"] - 0.4) <= 0.01
    pruned = apply_plan(NET, plan, X, structures=S)
    # the table walked over the pruned model's real widths gives the planned time, which here is its MACs
    walked = TABLE.total_ms(layer_widths(pruned))
    assert walked == pytest.approx(plan.achieved["latency_after_ms"], rel=1e-9)
    assert walked == pytest.approx(count_flops(pruned, X), rel=1e-9)
    for name, gp in plan.groups.items():
        if gp.remove:
            assert (gp.size - len(gp.remove)) % 4 == 0


def test_latency_plan_spends_no_accuracy_where_time_does_not_fall():
    # time of the full-resolution layers does not depend on width: a score order would remove their (least
    # important) channels first; the knapsack must leave them and remove where time falls
    def timer(layer, x):
        return 1.0 if x.dim() == 4 and x.shape[-1] == 12 else macs(layer, x)

    table = measure_latency_table(NET, S, X, step=1, timer=timer)
    cost = CostModel(NET, S, X, latency=table)
    flat_time = [g.name for i, g in enumerate(S)
                 if all(set(sum(table.layers[n].ms, [])) == {1.0} for n in cost.group_layers[i])]
    assert flat_time  # the first stage's inner groups
    scores = torch.cat([torch.full((g.size,), 0.01 if g.name in flat_time else 1.0, dtype=torch.float64)
                        + 1e-4 * torch.arange(g.size, dtype=torch.float64) for g in S])
    plan = make_plan(S, scores, cost, 0.3, budget="latency")
    assert all(not plan.groups[n].remove for n in flat_time)
    assert sum(len(g.remove) for g in plan.groups.values()) > 0
    by_score = make_plan(S, scores, CostModel(NET, S, X), 0.1, budget="flops")
    assert any(by_score.groups[n].remove for n in flat_time)  # what a score order does instead


def test_latency_plan_errors_say_what_to_do():
    scores = torch.rand(S.num_structures, dtype=torch.float64)
    with pytest.raises(ValueError, match="latency table"):
        make_plan(S, scores, CostModel(NET, S, X), 0.3, budget="latency")
    with pytest.raises(ValueError, match="implant_ratio=0"):
        make_plan(S, scores, COST, 0.3, budget="latency", implant_ratio=0.1)
    with pytest.raises(BudgetError, match="lower the target"):
        make_plan(S, scores, COST, 0.99, budget="latency", max_layer_ratio=0.2, tolerance=0.005)
    other = make_net(0, widths=(8,), blocks=1, classes=5)
    foreign = LatencyTable({"nope.conv": LayerTimes([1], [1], [[1.0]])}, 1)
    with pytest.raises(ValueError, match="measure the table on this model"):
        CostModel(other, build_structures(other, X), X, latency=foreign)
    wider = make_net(0, widths=(16, 24, 32), blocks=2, classes=7)  # same layers, another classifier width
    with pytest.raises(ValueError, match="5 channels, but this model's layer has 32 -> 7"):
        CostModel(wider, build_structures(wider, X), X, latency=TABLE)


def test_table_json_round_trip(tmp_path):
    TABLE.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again == TABLE
    alive = [g.size // 2 + 1 for g in S]
    assert CostModel(NET, S, X, latency=again).latency_ms(alive) == COST.latency_ms(alive)


@settings(max_examples=50, deadline=None)
@given(n_in=st.integers(1, 5), n_out=st.integers(1, 5), seed=st.integers(0, 1000),
       u=st.floats(0, 1), v=st.floats(0, 1))
def test_interpolation_is_exact_on_grid_points_and_bounded_between(n_in, n_out, seed, u, v):
    g = torch.Generator().manual_seed(seed)
    ins = sorted(set((torch.randperm(40, generator=g)[:n_in] + 1).tolist()))
    outs = sorted(set((torch.randperm(40, generator=g)[:n_out] + 1).tolist()))
    ms = torch.rand(len(ins), len(outs), generator=g).tolist()
    lt = LayerTimes(ins, outs, ms)
    for i, a in enumerate(ins):
        for j, b in enumerate(outs):
            assert lt(a, b) == pytest.approx(ms[i][j])
    x, y = ins[0] + u * (ins[-1] - ins[0]), outs[0] + v * (outs[-1] - outs[0])
    flat = [t for row in ms for t in row]
    assert min(flat) - 1e-12 <= lt(x, y) <= max(flat) + 1e-12
    assert lt(ins[0] - 5, outs[-1] + 5) == pytest.approx(ms[0][-1])  # clamped outside the grid


def test_wall_clock_table_on_a_tiny_net():
    net = make_net(0, widths=(8,), blocks=1, classes=3)
    s = build_structures(net, X)
    table = measure_latency_table(net, s, torch.randn(4, 1, 12, 12), step=4, repeats=2, warmup=1, threads=1)
    assert table.meta["batch"] == 4 and table.meta["threads"] == 1 and table.meta["timer"] == "wall clock"
    assert all(t > 0 for lt in table.layers.values() for row in lt.ms for t in row)
    # the rest of the forward pass (BatchNorm, ReLU, additions, pooling) is what the dense model's time leaves
    full = layer_widths(net)
    layers_ms = sum(lt(*full[n]) for n, lt in table.layers.items())
    assert table.meta["model_ms"] > 0 and table.other_ms == pytest.approx(max(0.0, table.meta["model_ms"] - layers_ms))
    assert table.total_ms(full) == pytest.approx(max(table.meta["model_ms"], layers_ms))
    assert TABLE.other_ms == 0.0  # an analytic timer times layers only
    with pytest.raises(ValueError, match="step >= 1"):
        measure_latency_table(net, s, X, step=0)


@pytest.mark.parametrize("name", ["densenet", "mobilenetv2"])
@pytest.mark.parametrize("allocation", ["cost-aware", "global"])
def test_latency_of_concatenation_and_depthwise_graphs_follows_every_group(name, allocation):
    # a concatenation's consumer is sliced by several groups, a depthwise conv has one width: the predicted widths
    # and times must be the pruned model's, whichever allocation made the plan
    model, x = make(name)
    structures = build_structures(model, x)
    table = measure_latency_table(model, structures, x, step=2, timer=macs)
    cost = CostModel(model, structures, x, latency=table)
    scores = torch.rand(structures.num_structures, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = make_plan(structures, scores, cost, 0.35, budget="latency", round_to=2, allocation=allocation,
                     tolerance=0.03)
    assert plan.allocation == allocation
    pruned = apply_plan(model, plan, x, structures=structures)
    real = layer_widths(pruned)
    removed = [plan.groups[n].remove for n in structures.names]
    assert cost.layer_widths(removed=removed) == {n: real[n] for n in table.layers}
    assert table.total_ms(real) == pytest.approx(plan.achieved["latency_after_ms"], rel=1e-9)
