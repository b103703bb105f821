"""benchmarks/sweep.py tables: README values (mean ± std, change vs dense, goal verdicts) and the SVG plots, from
synthetic per-run records with known accuracies (no pruning, no training)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from benchmarks_loader import load_benchmark

DENSE = 0.90

sweep = load_benchmark("sweep")

# (criterion, budget, target) -> fine-tuned accuracy per seed
FINETUNED = {
    ("hap", "params", 0.5): [0.895, 0.896, 0.894],
    ("hap+comp", "params", 0.5): [0.899, 0.898, 0.900],      # best HAP row: -0.10 ± 0.10 pp vs dense: goal 1 met
    ("l2", "params", 0.5): [0.880, 0.882, 0.884],            # best HAP - l2 = 1.9, 1.6, 1.6: interval > 0
    ("l2+comp", "params", 0.5): [0.897, 0.899, 0.893],       # best HAP - l2+comp = 0.2, -0.1, 0.7: contains 0
    ("hap+comp", "params", 0.7): [0.888, 0.892],             # -1.00 ± 0.28 pp: goal 1 not met
    ("l2", "params", 0.7): [0.889, 0.887],
    ("hap+comp", "flops", 0.5): [0.900, 0.895, 0.897],       # minus l2+comp = 0.2, -0.1, -0.2: goal 3 not met
    ("l2+comp", "flops", 0.5): [0.898, 0.896, 0.899],
}
WIDTH_ROW = ("hap+comp", "params", 0.5)
# plan widths of hap+comp at 50% params: seed 0 has none, seeds 1 and 2 do
WIDTHS = {1: {"model.layer2.0.shortcut.0": [32, 10, 2], "model.conv1": [16, 4, 1],
              "model.layer1.10.conv1": [16, 8, 0], "model.layer1.2.conv1": [16, 0, 0]},
          2: {"model.conv1": [16, 2, 0], "model.layer1.2.conv1": [16, 2, 0]}}


def _record(criterion: str, budget: str, target: float, seed: int, finetuned: float) -> dict:
    widths = WIDTHS.get(seed) if (criterion, budget, target) == WIDTH_ROW else None
    other = target - 0.2  # the budget not targeted moves less
    removed = {"params": target, "flops": other} if budget == "params" else {"params": other, "flops": target}
    return {
        "model": "resnet20", "criterion": criterion, "budget": budget, "target": target, "seed": seed,
        "preset": {"name": "tiny", "epochs": 1, "max_batches_per_epoch": 2, "batch_size": 8, "lr": 0.01,
                   "schedule": "cosine"},
        "device": "cpu",
        "params": {"before": 1000, "after": round(1000 * (1 - removed["params"])), "removed": removed["params"]},
        "flops": {"before": 5000, "after": round(5000 * (1 - removed["flops"])), "removed": removed["flops"]},
        "accuracy": {"dense": DENSE, "oneshot": finetuned - 0.1, "finetuned": finetuned, "eval_images": 100,
                     # compensated runs record the one-shot accuracy before BatchNorm re-estimation too
                     "oneshot_before_bn_reestimate": finetuned - 0.05 if criterion.endswith("+comp") else None},
        "spec": {"compensate": "sequential"} if criterion.endswith("+comp") else {},
        "sensitivity_seconds": 1.5,
        "calibration": {"protocol": sweep.CALIBRATION_PROTOCOL, "seed": seed},
        "details": {**({} if widths is None else {"plan_widths": widths}),
                    **({"apply_seconds": 1.0 + seed} if criterion.endswith("+comp") else {})},
    }


def _write_records(results: Path, drop_widths: bool = False) -> Path:
    for (criterion, budget, target), accs in FINETUNED.items():
        for seed, acc in enumerate(accs):
            record = _record(criterion, budget, target, seed, acc)
            if drop_widths:
                record["details"].pop("plan_widths", None)
            path = results / "resnet20" / f"{sweep.run_id('tiny', criterion, budget, target, seed)}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    return results


def _section(text: str, heading: str) -> str:
    """The README section whose heading starts with ``heading`` (up to the next ``## ``)."""
    (match,) = [s for s in text.split("\n## ") if s.startswith(heading)]
    return match


def _row(section: str, *first_cells: str) -> list[str]:
    """Cells of the Markdown table row of ``section`` starting with ``first_cells``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    (row,) = [r for r in rows if r[:len(first_cells)] == list(first_cells)]
    return row


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    results = _write_records(tmp_path_factory.mktemp("sweep"))
    sweep.write_tables(results)
    return results


def test_table_values(written):
    text = (written / "README.md").read_text(encoding="utf-8")
    p50 = _section(text, "resnet20, p50")
    assert "fine-tuned change vs dense (pp)" in p50
    header = _row(p50, "criterion")
    comp = dict(zip(header, _row(p50, "hap+comp")))
    assert comp["fine-tuned acc %"] == "89.90 ± 0.10 (n=3)"
    # a compensated row's one-shot accuracy follows the BatchNorm policy after compensation; the others never do
    assert comp["one-shot acc %"] == ("79.90" if sweep.REESTIMATE_BN_AFTER_COMPENSATION else "84.90") + " ± 0.10 (n=3)"
    assert dict(zip(header, _row(p50, "hap")))["one-shot acc %"] == "79.50 ± 0.10 (n=3)"
    assert comp["fine-tuned change vs dense (pp)"] == "-0.10 ± 0.10"
    assert comp["params removed %"] == "50.00" and comp["FLOPs removed %"] == "30.00"
    assert comp["surgery + compensation s"] == "2.00"  # mean of 1, 2, 3 s
    l2 = dict(zip(header, _row(p50, "l2")))
    assert l2["fine-tuned acc %"] == "88.20 ± 0.20 (n=3)" and l2["fine-tuned change vs dense (pp)"] == "-1.80 ± 0.20"
    assert l2["surgery + compensation s"] == "-"  # not recorded
    p70 = _section(text, "resnet20, p70")
    assert _row(p70, "hap+comp")[5] == "-1.00 ± 0.28"
    f50 = _section(text, "resnet20, f50")
    assert _row(f50, "l2+comp")[4] == "89.77 ± 0.15 (n=3)"
    # tables with parameter targets first; rows in CRITERIA order, each +comp row right after its plain row
    assert text.index("## resnet20, p50") < text.index("## resnet20, p70") < text.index("## resnet20, f50")
    assert p50.index("| hap |") < p50.index("| hap+comp |") < p50.index("| l2 |") < p50.index("| l2+comp |")


def test_other_protocols_never_mixed_in(tmp_path):
    results = _write_records(tmp_path)
    legacy = _record("l2", "params", 0.5, 7, 0.10)  # first-512-images calibration: no protocol recorded
    del legacy["calibration"]
    (results / "resnet20" / "tiny__l2__p50__s7.json").write_text(json.dumps(legacy))
    assert all(r["seed"] != 7 for r in sweep.load_records(results))
    l2 = _row(_section(sweep.tables(results), "resnet20, p50"), "l2")
    assert l2[4] == "88.20 ± 0.20 (n=3)"


def test_plot_links_above_their_tables(written):
    text = (written / "README.md").read_text(encoding="utf-8")
    lines = {"acc_vs_params", "acc_vs_flops", "oneshot_vs_params"}

    def linked(section: str) -> set[str]:
        names = re.findall(r"!\[[^\]]*\]\(resnet20_tiny_(\w+)\.svg\)", section)
        assert all((written / f"resnet20_tiny_{n}.svg").is_file() for n in names)  # relative paths that exist
        return set(names)

    assert linked(_section(text, "resnet20, p50")) == lines | {"plan_widths_p50"}
    assert linked(_section(text, "resnet20, p70")) == lines
    assert linked(_section(text, "resnet20, f50")) == set()  # plots are drawn from parameter budgets only
    assert "SVG" in text.split("\n## ")[0]


def _interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences, from scipy (the exact reference)."""
    stats = pytest.importorskip("scipy.stats")
    mean = sum(diffs) / len(diffs)
    low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    return mean, low, high


def _fmt(diffs: list[float]) -> str:
    mean, low, high = _interval(diffs)
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def test_goal_verdicts(written):
    goals = _section((written / "README.md").read_text(encoding="utf-8"), "Goals: resnet20, budget `tiny`")
    # goal 1: the best HAP row (hap+comp) against dense, every HAP row listed
    assert _row(goals, "50%", "**hap+comp** (best)") == ["50%", "**hap+comp** (best)", "3",
                                                          _fmt([-0.1, -0.2, 0.0]), "≥ -0.3", "met"]
    assert _row(goals, "50%", "hap")[-1] == "(not the best HAP row)"
    assert _row(goals, "70%", "**hap+comp** (best)") == ["70%", "**hap+comp** (best)", "2", _fmt([-1.2, -0.8]),
                                                          "≥ -0.8", "not met"]
    # goal 2: best HAP row minus every non-HAP row, paired by seed
    assert _row(goals, "p50", "hap+comp", "l2") == ["p50", "hap+comp", "l2", "3", _fmt([1.9, 1.6, 1.6]), "met"]
    assert _row(goals, "p50", "hap+comp", "l2+comp") == ["p50", "hap+comp", "l2+comp", "3", _fmt([0.2, -0.1, 0.7]),
                                                         "not met"]
    assert _row(goals, "p50", "**all of the above**")[-1] == "**not met**"
    assert _row(goals, "p70", "hap+comp", "l2") == ["p70", "hap+comp", "l2", "2", _fmt([-0.1, 0.5]), "not met"]
    # goal 3: hap+comp vs l2+comp at f50
    assert _row(goals.split("**(3)")[1], "f50") == ["f50", "hap+comp", "l2+comp", "3", _fmt([0.2, -0.1, -0.2]),
                                                    "not met (interval contains 0)"]


def test_paired_difference_matches_scipy_and_pairs_by_seed():
    def recs(accs: dict[int, float | None]) -> list[dict]:
        return [{"seed": s, "accuracy": {"finetuned": a}} for s, a in accs.items()]

    d = sweep.paired_difference(recs({0: 0.91, 1: 0.93, 2: 0.90, 5: 0.99}), recs({2: 0.89, 0: 0.90, 1: 0.925}))
    mean, low, high = _interval([1.0, 0.5, 1.0])  # seed 5 has no partner; pairs are matched by seed, not order
    assert d.seeds == (0, 1, 2) and d.n == 3
    assert (d.mean, d.low, d.high) == pytest.approx((mean, low, high), abs=1e-9)
    one = sweep.paired_difference(recs({0: 0.9}), recs({0: 0.8, 1: 0.7}))
    assert one.n == 1 and one.low is None and one.mean == pytest.approx(10.0)
    assert sweep.paired_difference(recs({0: None}), recs({0: 0.8})) is None  # not fine-tuned: no pair


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 61)) + [75, 100, 250, 1000]:
        assert sweep.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-5)
    with pytest.raises(ValueError):
        sweep.t_quantile_975(0)


def test_plan_width_plot_only_where_widths_exist(written):
    # the figures themselves (data drawn, order, fallback) are checked in tests/test_plots.py
    assert (written / "resnet20_tiny_plan_widths_p50.svg").is_file()
    assert not (written / "resnet20_tiny_plan_widths_p70.svg").exists()  # no record there has plan widths
    assert not list(written.glob("*_f50*.svg"))


def test_no_plan_widths_no_width_plot(tmp_path):
    results = _write_records(tmp_path, drop_widths=True)
    sweep.write_tables(results)
    assert sorted(p.name for p in results.glob("*.svg")) == [
        "resnet20_tiny_acc_vs_flops.svg", "resnet20_tiny_acc_vs_params.svg", "resnet20_tiny_oneshot_vs_params.svg"]
    assert "plan_widths" not in (results / "README.md").read_text(encoding="utf-8")


def test_width_plot_falls_back_to_hap(tmp_path):
    record = _record("hap", "params", 0.5, 3, 0.89)
    record["details"] = {"plan_widths": {"conv1": [16, 4, 0], "fc": [10, 0, 0]}}
    (tmp_path / "resnet20").mkdir()
    (tmp_path / "resnet20" / "tiny__hap__p50__s3.json").write_text(json.dumps(record))
    sweep.write_tables(tmp_path)
    assert (tmp_path / "resnet20_tiny_plan_widths_p50.svg").is_file()
    goals = _section((tmp_path / "README.md").read_text(encoding="utf-8"), "Goals")
    assert _row(goals, "p50")[-1] == "no fine-tuned other row yet"


def test_no_records(tmp_path):
    assert "No results yet" in sweep.tables(tmp_path)
    assert sweep.plots(tmp_path) == []


def test_short_names_and_order():
    assert sweep._short_names(["features.0", "features.10"]) == ["0", "10"]
    assert sweep._short_names(["conv1", "layer1.0.conv1"]) == ["conv1", "layer1.0.conv1"]
    assert sweep._short_names(["a.b", "a.b.c"]) == ["b", "b.c"]  # every name keeps a component
    names = ["features.10", "features.3", "features.0"]
    assert sorted(names, key=sweep._network_order) == ["features.0", "features.3", "features.10"]
