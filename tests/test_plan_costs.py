"""The planner on every graph: exact counts, implants that never cut the input, notes, the cost-aware knapsack."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haprune.apply import apply_plan
from haprune.graph import build_structures
from haprune.plan import ALLOCATIONS, DEFAULT_ALLOCATION, BudgetError, CostModel, Plan, make_plan
from haprune.report import count_flops, count_params
from nets import make_net
from zoo import make

# ---------------------------------------------------------------------------------------------- exact counts

# residual, concatenation (DenseNet), depthwise (MobileNetV2), squeeze-excitation, layer scale, window attention
EXACT = ["resnet_basic", "densenet", "mobilenetv2", "efficientnet", "convnext", "swin"]


def _generated_plans(name: str, structures, cost, n: int = 20):
    """``n`` plans from random scores, targets, budgets, allocations and implant ratios (seeded by the name)."""
    rng = random.Random(name)
    for i in range(n):
        scores = torch.rand(structures.num_structures, generator=torch.Generator().manual_seed(i),
                            dtype=torch.float64)
        options = dict(budget=rng.choice(["params", "flops"]), allocation=rng.choice(ALLOCATIONS),
                       implant_ratio=rng.choice([0.0, 0.0, 0.2, 0.5]), implant_kind=rng.choice(["1x1", "separable"]))
        target = rng.uniform(0.2, 0.7)
        try:
            yield make_plan(structures, scores, cost, target, tolerance=0.05, **options), options
        except BudgetError:
            yield None, options


def _check_exact(name: str) -> int:
    model, x = make(name)
    structures = build_structures(model, x)
    cost = CostModel(model, structures, x)
    assert cost.dense() == (count_params(model), count_flops(model, x))
    checked = 0
    for plan, options in _generated_plans(name, structures, cost):
        if plan is None:
            continue
        pruned = apply_plan(model, plan, x, structures=structures)
        measured = (count_params(pruned), count_flops(pruned, x))
        planned = (plan.achieved["params_after"], plan.achieved["flops_after"])
        assert planned == measured, (name, options, plan.counts())
        assert cost.count_plan(plan) == measured
        checked += 1
    return checked


@pytest.mark.parametrize("name", EXACT)
def test_plan_counts_equal_the_pruned_models_measured_params_and_flops(name):
    assert _check_exact(name) >= 15  # most of the 20 generated plans are feasible (the rest raise BudgetError)


def test_plan_counts_are_exact_on_grouped_convolutions():
    assert _check_exact("resnext") >= 15


def test_dense_counts_of_grouped_convolutions_match_the_measured_ones():
    model, x = make("resnext")
    structures = build_structures(model, x)
    assert CostModel(model, structures, x).dense() == (count_params(model), count_flops(model, x))


class _Windows(nn.Module):
    """Swin-like: a Linear applied to windows folded into the batch dimension (batch x windows, tokens, dim)."""

    def __init__(self, dim: int = 8, hidden: int = 12, window: int = 2):
        super().__init__()
        self.window = window
        self.embed = nn.Conv2d(1, dim, 2, 2)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        b, h, w, c = x.shape
        s = self.window
        t = x.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.reshape(b, -1, c).mean(1))


def test_window_attention_flops_count_every_window_of_every_sample():
    torch.manual_seed(0)
    model = _Windows().eval()
    x = torch.randn(3, 1, 8, 8)  # 4 x 4 patches, 2 x 2 windows: 4 windows of 4 tokens per sample
    structures = build_structures(model, x)
    cost = CostModel(model, structures, x)
    tokens = 16  # per sample, over all its windows
    expected = 16 * 8 * 4 + tokens * (8 * 12 + 12 * 8) + 8 * 3  # embed conv, fc1 + fc2 on every token, head
    assert cost.dense()[1] == count_flops(model, x) == expected
    scores = torch.rand(structures.num_structures, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = make_plan(structures, scores, cost, 0.4, budget="flops", tolerance=0.05)
    pruned = apply_plan(model, plan, x, structures=structures)
    assert plan.achieved["flops_after"] == count_flops(pruned, x)
    fc1 = pruned.fc1
    assert count_flops(pruned, x) == 16 * fc1.in_features * 4 + tokens * 2 * fc1.in_features * fc1.out_features \
        + fc1.in_features * 3


# ---------------------------------------------------------------------------------------------- implants


class _StemOnly(nn.Module):
    """Only the stem is a plain k x k conv (the rest 1 x 1 and depthwise): the one layer that takes implants."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.pw = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.bn(self.stem(x)))))
        return self.head(torch.relu(self.pw(x)).mean((2, 3)))


torch.manual_seed(0)
STEM = _StemOnly().eval()
STEM_X = torch.randn(1, 1, 8, 8)
STEM_S = build_structures(STEM, STEM_X)
STEM_COST = CostModel(STEM, STEM_S, STEM_X)
STEM_GROUP = next(g.name for g in STEM_S if "stem" in g.implantable)  # the group of the stem's outputs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), target=st.floats(0.05, 0.6), ratio=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
       cap=st.floats(0.5, 1.0), min_channels=st.integers(1, 3), stem_last=st.booleans(),
       allocation=st.sampled_from(ALLOCATIONS))
def test_implants_never_replace_a_groups_last_real_channels(seed, target, ratio, cap, min_channels, stem_last,
                                                             allocation):
    scores = torch.rand(STEM_S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if stem_last:  # the stem's channels the least important: every one of them is a candidate for an implant
        scores[STEM_S.offsets[STEM_GROUP]: STEM_S.offsets[STEM_GROUP] + 12] -= 2
    try:
        plan = make_plan(STEM_S, scores, STEM_COST, target, implant_ratio=ratio, max_layer_ratio=cap,
                         min_channels=min_channels, tolerance=0.1, allocation=allocation)
    except BudgetError:
        return
    for g in STEM_S:
        gp = plan.groups[g.name]
        real = max(min_channels, g.size - math.floor(cap * g.size + 1e-9), 1)
        assert len(gp.keep) >= real, (g.name, gp)
    assert plan.counts()["implanted"] <= round(ratio * plan.counts()["removed"])


def test_a_plan_with_implants_keeps_the_output_dependent_on_the_input():
    # the case of issue 19: many implants asked for where only the stem can take them
    scores = torch.rand(STEM_S.num_structures, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores[STEM_S.offsets[STEM_GROUP]: STEM_S.offsets[STEM_GROUP] + 12] -= 2
    plan = make_plan(STEM_S, scores, STEM_COST, 0.2, implant_ratio=10.0, tolerance=0.1)
    assert plan.groups[STEM_GROUP].implant and plan.groups[STEM_GROUP].keep
    pruned = apply_plan(STEM, plan, STEM_X, structures=STEM_S)  # zero-init implants
    inputs = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_spread = STEM(inputs).std(0).mean()
        spread = pruned(inputs).std(0).mean()
    assert spread > 0.01 * dense_spread
    assert any("implants placed" in n for n in plan.notes)  # fewer than asked: said so


def test_implants_asked_for_where_no_layer_can_take_one_are_noted_and_round_trip():
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 6)
    structures = build_structures(net, x)
    scores = torch.rand(structures.num_structures, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = make_plan(structures, scores, CostModel(net, structures, x), 0.3, implant_ratio=0.2, tolerance=0.05)
    assert plan.counts()["implanted"] == 0
    assert len(plan.notes) == 1 and "no implants" in plan.notes[0] and "k x k" in plan.notes[0]
    back = Plan.from_json(plan.to_json())
    assert back.notes == plan.notes and back.allocation == plan.allocation == "global"
    plain = make_plan(structures, scores, CostModel(net, structures, x), 0.3, tolerance=0.05)
    assert plain.notes == []


def test_a_plan_saved_before_notes_and_allocation_existed_still_loads():
    old = json.loads(make_plan(STEM_S, torch.rand(STEM_S.num_structures, dtype=torch.float64), STEM_COST, 0.3,
                               tolerance=0.1).to_json())
    del old["notes"], old["allocation"]
    plan = Plan.from_dict(old)
    assert plan.notes == [] and plan.allocation == ""


# ---------------------------------------------------------------------------------------------- allocation

X = torch.randn(1, 1, 12, 12)
NET = make_net(0, widths=(16, 24, 32), blocks=2, classes=5)
S = build_structures(NET, X)
COST = CostModel(NET, S, X)


def test_allocation_is_recorded_and_checked():
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for allocation in ALLOCATIONS:
        plan = make_plan(S, scores, COST, 0.4, allocation=allocation)
        assert plan.allocation == allocation
        assert abs(plan.achieved["params_removed"] - 0.4) <= 0.01
        assert Plan.from_json(plan.to_json()).allocation == allocation
    with pytest.raises(ValueError, match="allocation must be one of"):
        make_plan(S, scores, COST, 0.4, allocation="greedy")


def test_default_allocation_follows_the_budget():
    # params: the raw ranking; FLOPs: the knapsack (docs/results/allocation.md); an explicit choice always wins
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert make_plan(S, scores, COST, 0.4).allocation == DEFAULT_ALLOCATION["params"] == "global"
    plan = make_plan(S, scores, COST, 0.4, budget="flops")
    assert plan.allocation == DEFAULT_ALLOCATION["flops"] == "cost-aware"
    assert plan.to_dict() == make_plan(S, scores, COST, 0.4, budget="flops", allocation="cost-aware").to_dict()
    assert make_plan(S, scores, COST, 0.4, budget="flops", allocation="global").allocation == "global"


def _removed_score(plan, scores):
    flat = S.split(scores)
    return sum(float(flat[n][g.remove].sum()) for n, g in plan.groups.items())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.floats(0.2, 0.7), budget=st.sampled_from(["params", "flops"]))
def test_cost_aware_spends_less_score_per_unit_saved_when_costs_differ(seed, target, budget):
    # scores that ignore cost (uniform per channel): the knapsack takes the channels that save most per unit of
    # score, so it meets the same budget removing less summed score than the score order does
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plans = {a: make_plan(S, scores, COST, target, budget=budget, allocation=a, tolerance=0.02) for a in ALLOCATIONS}
    for plan in plans.values():
        assert abs(plan.achieved[f"{budget}_removed"] - target) <= 0.02
        for g in S:  # within a group, the least important channels go first
            gp, flat = plan.groups[g.name], S.split(scores)[g.name]
            if gp.remove and gp.keep:
                assert float(flat[gp.remove].max()) <= float(flat[gp.keep].min())
    assert _removed_score(plans["cost-aware"], scores) <= _removed_score(plans["global"], scores) + 1e-9


def test_cost_aware_takes_the_cheaper_to_lose_per_parameter_channels():
    # equal scores everywhere: the knapsack removes the channels that carry most parameters per unit of score
    scores = torch.ones(S.num_structures, dtype=torch.float64) + 1e-6 * torch.arange(S.num_structures)
    plan = make_plan(S, scores, COST, 0.3, allocation="cost-aware", tolerance=0.02)
    numel = S.split(S.numel())
    per_channel = {g.name: float(numel[g.name].mean()) for g in S}
    touched = [n for n, g in plan.groups.items() if g.remove]
    untouched = [n for n, g in plan.groups.items() if not g.remove]
    assert touched and untouched
    assert min(per_channel[n] for n in touched) >= max(per_channel[n] for n in untouched) * 0.5


def test_global_allocation_is_the_raw_ranking():
    scores = torch.rand(S.num_structures, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan = make_plan(S, scores, COST, 0.4, allocation="global", max_layer_ratio=0.8, tolerance=0.05)
    flat = S.split(scores)
    removed = [v for n, g in plan.groups.items() for v in flat[n][g.remove].tolist()]
    free_kept = [v for n, g in plan.groups.items() if len(g.remove) < int(0.8 * g.size)
                 for v in flat[n][g.keep].tolist()]
    assert max(removed) <= min(free_kept)


def test_the_latency_module_does_not_import_the_report():
    code = "import sys, haprune.latency; print('haprune.report' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    from haprune.report import num_threads as from_report
    from haprune.threads import num_threads
    assert from_report is num_threads
