"""Measured size and speed, tables, and report.json."""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest
import torch
import torch.nn as nn

from haprune.apply import apply_plan
from haprune.graph import build_structures
from haprune.models import create_model
from haprune.graph import eval_mode
from haprune.plan import CostModel, GroupPlan, Plan, make_plan
from haprune.report import (
    STRUCTURE_COLUMNS,
    build_report,
    count_flops,
    count_params,
    format_table,
    measure_latency,
    model_costs,
    num_threads,
    structure_table,
    write_report,
)

X = torch.zeros(1, 1, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs run fastest on one thread; on a busy machine, many threads crawl."""
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1, num_classes=10).eval()
    s = build_structures(m, X)
    return m, s, CostModel(m, s, X)


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),  # params 2*1*9 + 2 = 20; MACs (2*4*4) * 1 * 9 = 288
        nn.Conv2d(2, 2, 3, padding=1, groups=2),  # depthwise: params 2*1*9 + 2 = 20; MACs 32 * 1 * 9 = 288
        nn.Conv2d(2, 4, 1, stride=2, bias=False),  # params 8; MACs (4*2*2) * 2 * 1 = 32
        nn.Flatten(),
        nn.Linear(16, 3),  # params 48 + 3 = 51; MACs 3 * 16 = 48
    )


def test_counts_by_hand():
    m = _tiny()
    assert count_params(m) == 20 + 20 + 8 + 51
    assert count_flops(m, torch.zeros(5, 1, 4, 4)) == 288 + 288 + 32 + 48  # per sample, batch 5
    assert model_costs(m, torch.zeros(1, 1, 4, 4)) == {"params": 99, "flops": 656}


def test_flops_of_transposed_conv_and_shared_layer():
    up = nn.ConvTranspose2d(2, 3, 2, stride=2, bias=False)  # each of 2*4*4 inputs meets 3*2*2 weights
    assert count_flops(up, torch.zeros(2, 2, 4, 4)) == 32 * 12
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.ReLU(), lin)  # called twice: counted twice, its parameters once
    assert count_flops(shared, torch.zeros(3, 4)) == 32
    assert count_params(shared) == 20


def test_dense_counts_match_cost_model(resnet):
    m, _, cm = resnet
    assert (count_params(m), count_flops(m, X)) == cm.dense()


@pytest.mark.parametrize("kind,ratio", [("1x1", 0.0), ("1x1", 0.3), ("separable", 0.3)])
def test_pruned_counts_match_cost_model(resnet, kind, ratio):
    """The planner's predicted size is the pruned model's measured size, implants included."""
    m, s, cm = resnet
    scores = torch.rand(s.num_structures, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plan = make_plan(s, scores, cm, 0.4, implant_ratio=ratio, implant_kind=kind)
    assert (plan.counts()["implanted"] > 0) == (ratio > 0)
    pm = apply_plan(m, plan, X, structures=s)
    assert count_params(pm) == plan.achieved["params_after"]
    assert count_flops(pm, X) == plan.achieved["flops_after"]


def test_measure_latency():
    models = {"a": _tiny().eval(), "b": _tiny().train()}
    before = torch.get_num_threads()
    result = measure_latency(models, torch.zeros(2, 1, 4, 4), threads=2, repeats=5, warmup=1)
    assert torch.get_num_threads() == before
    assert list(result) == ["a", "b"]
    for r in result.values():
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    assert not models["a"].training and models["b"].training  # modes restored


def test_eval_mode_restores_mixed_modes():
    m = _tiny()
    m[1].eval()  # e.g. a frozen layer inside a training model
    with eval_mode(m):
        assert not any(x.training for x in m.modules())
    assert [x.training for x in m.modules()] == [True, True, False, True, True, True]
    with pytest.raises(ValueError, match="at least one model"):
        measure_latency({}, torch.zeros(1))


def _plan() -> Plan:
    return Plan({"conv1": GroupPlan(16, remove=[0, 1, 2], implant=[3]), "layer1.0.conv1": GroupPlan(8)},
                target=0.5, achieved={"params_before": 100, "params_after": 50}, criterion="l2")


def test_structure_table():
    assert structure_table(_plan()) == [
        {"name": "conv1", "size": 16, "kept": 12, "implanted": 1, "removed": 3},
        {"name": "layer1.0.conv1", "size": 8, "kept": 8, "implanted": 0, "removed": 0},
    ]


def test_format_table_aligns():
    rows = structure_table(_plan()) + [{"name": "x", "size": 1234, "kept": 0.5, "implanted": None}]
    assert format_table(rows, STRUCTURE_COLUMNS) == "\n".join([
        "name            size  kept  implanted  removed",
        "--------------  ----  ----  ---------  -------",
        "conv1             16    12          1        3",
        "layer1.0.conv1     8     8          0        0",
        "x               1234   0.5          -        -",
    ])


def test_build_and_write_report(tmp_path):
    plan = _plan()
    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    report = build_report(
        model={"name": "resnet20", "in_channels": 1}, plan=plan,
        costs_before={"params": 200, "flops": 1000}, costs_after={"params": 50, "flops": 400},
        accuracy_before=0.91, accuracy_oneshot=float("nan"), accuracy_finetuned=None,
        latency_before={"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.2},
        latency_after={"median_ms": 0.5, "p10_ms": 0.4, "p90_ms": 0.6},
        settings={"target": 0.5, "device": torch.device("cpu")}, started_at=start,
    )
    assert report["params"] == {"before": 200, "after": 50, "ratio": 0.25, "removed": 0.75}
    assert math.isclose(report["flops"]["removed"], 0.6)
    assert report["latency"]["speedup"] == 4.0
    assert report["accuracy"] == {"before": 0.91, "after_oneshot": None, "after_finetune": None}
    assert report["plan"]["counts"] == {"removed": 3, "implanted": 1, "kept": 20}
    assert report["plan"]["groups"] == structure_table(plan)
    assert report["sensitivity"]["criterion"] == "l2"
    assert report["settings"]["device"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["python"]
    assert report["timestamps"]["started"].startswith("2024-01-01")
    path = tmp_path / "out" / "report.json"
    write_report(path, report)
    assert json.loads(path.read_text()) == report


def test_report_summarises_the_scores_of_each_group(resnet):
    import numpy as np

    from haprune.estimate import Sensitivity
    from haprune.report import sensitivity_summary

    m, s, cost = resnet
    scores = torch.arange(s.num_structures, dtype=torch.float64).flip(0) ** 1.5  # distinct, known values
    sens = Sensitivity("l2", scores)
    summary = sensitivity_summary(sens, s)["per_group"]
    assert list(summary) == s.names
    for name, part in s.split(scores).items():
        q = np.quantile(part.numpy(), [0, 0.25, 0.5, 0.75, 1])
        assert [summary[name][k] for k in ("min", "q1", "median", "q3", "max")] == pytest.approx(q.tolist())
        assert summary[name]["n"] == part.numel()
    plan = make_plan(s, scores, cost, 0.3)
    report = build_report(model="resnet20", plan=plan, costs_before={"params": 2, "flops": 2},
                          costs_after={"params": 1, "flops": 1}, sensitivity=sens, structures=s)
    assert report["sensitivity"]["per_group"] == summary
    assert "per_group" not in build_report(model="resnet20", plan=plan, costs_before={"params": 2, "flops": 2},
                                           costs_after={"params": 1, "flops": 1}, sensitivity=sens)["sensitivity"]
