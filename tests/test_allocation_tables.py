"""benchmarks/allocation.py tables: paired differences and the verdict per budget kind, from synthetic records with
known accuracies (no pruning), and the check that the verdict names a default the code does not use."""
from __future__ import annotations

import pytest
from benchmarks_loader import load_benchmark

allocation = load_benchmark("allocation")


def record(criterion, seed, budget, target, alloc, comp, val, test=None):
    return {"criterion": criterion, "seed": seed, "budget": budget, "target": target, "allocation": alloc,
            "compensate": comp, "val_accuracy": val, "test_accuracy": val if test is None else test,
            "params_removed": target, "flops_removed": target,
            "shape": {"groups": 30, "groups_at_cap": 2, "min_kept_fraction": 0.109}}


def runs_from(cells):
    """cells: (criterion, budget, target, comp) -> (global accuracies per seed, cost-aware accuracies per seed)."""
    runs = {}
    for (criterion, budget, target, comp), (glob, cost) in cells.items():
        for alloc, accs in (("global", glob), ("cost-aware", cost)):
            for seed, acc in enumerate(accs):
                rid = allocation.run_id(criterion, seed, budget, target, alloc, comp)
                runs[rid] = record(criterion, seed, budget, target, alloc, comp, acc)
    return runs


CELLS = {
    # flops: cost-aware ahead beyond the spread for hap (diffs 0.004, 0.005, 0.003), level for l2
    ("hap", "flops", 0.5, True): ([0.930, 0.931, 0.932], [0.934, 0.936, 0.935]),
    ("l2", "flops", 0.5, True): ([0.940, 0.941, 0.942], [0.941, 0.939, 0.943]),
    # params: level with compensation, global far ahead without
    ("hap", "params", 0.5, True): ([0.940, 0.941, 0.942], [0.941, 0.940, 0.942]),
    ("hap", "params", 0.5, False): ([0.860, 0.850, 0.870], [0.780, 0.770, 0.785]),
}


def test_paired_differences_are_cost_aware_minus_global_by_seed():
    runs = runs_from(CELLS)
    diffs = allocation.paired(runs, "hap", "flops", 0.5, True, "val")
    assert sorted(round(d, 6) for d in diffs) == [0.003, 0.004, 0.005]
    m, half = allocation.interval(diffs)
    assert m == pytest.approx(0.004) and 0 < half < m   # t(2) = 4.303 * 0.001 / sqrt(3)


def test_verdict_per_budget_follows_the_compensated_pipeline():
    runs = runs_from(CELLS)
    assert allocation.favoured(runs, "flops", True) == ("cost-aware", 1, 2)
    assert allocation.favoured(runs, "params", True) == (None, 0, 1)
    assert allocation.favoured(runs, "params", False) == ("global", 1, 1)
    lines = allocation.verdict(runs)
    flops = next(line for line in lines if line.startswith("- **flops**"))
    params = next(line for line in lines if line.startswith("- **params**"))
    assert "should follow" not in flops            # the code's FLOPs default is the knapsack
    assert "does not separate them" in params and "`global` ahead in 1 of 1" in params


def test_verdict_says_when_the_default_should_change():
    flipped = {k: (cost, glob) for k, (glob, cost) in CELLS.items()}  # global now ahead at flops
    lines = allocation.verdict(runs_from(flipped))
    assert "should follow" in next(line for line in lines if line.startswith("- **flops**"))


def test_tables_list_every_cell_and_its_paired_row():
    text = allocation.tables({"meta": {"model": "resnet56", "dense_val_accuracy": 0.94, "dense_test_accuracy": 0.945,
                                       "val_images": 5000, "test_images": 10000, "calibration": "4 x 128",
                                       "bn_reestimation": "4 batches (plain runs only)"},
                              "runs": runs_from(CELLS)})
    assert text.count("| hap | flops 50% | comp |") == 3            # two allocation rows and the paired row
    assert "| hap | flops 50% | comp | +0.40 [" in text
    assert "## Verdict" in text


@pytest.mark.parametrize("bad", ["latency:0.5", "params", "0.5"])
def test_target_specs_are_checked(bad):
    with pytest.raises(Exception, match="params:<fraction>"):
        allocation.parse_target(bad)
