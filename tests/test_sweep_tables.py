"""benchmarks/sweep.py tables: README values (mean ± std, change vs dense, goal verdicts) and the SVG plots, from
synthetic per-run records with known accuracies (no pruning, no training)."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from benchmarks_loader import load_benchmark

NS = "{http://www.w3.org/2000/svg}"
DENSE = 0.90




sweep = load_benchmark("sweep")

# (criterion, budget, target) -> fine-tuned accuracy per seed
FINETUNED = {
    ("hap+ni-lstsq", "params", 0.5): [0.899, 0.898, 0.900],  # -0.10 ± 0.10 pp: goal (a) met
    ("l1", "params", 0.5): [0.880, 0.882, 0.884],            # margin +1.70 > spread 0.20: goal (b) met
    ("hap+ni-lstsq", "params", 0.7): [0.888, 0.892],         # -1.00 ± 0.28 pp: goal (a) not met
    ("l1", "params", 0.7): [0.889, 0.887],                   # margin +0.20 < spread 0.28: goal (b) not met
    ("hap+ni-lstsq", "flops", 0.5): [0.900],                 # margin +5.00 with n=1: not enough seeds
    ("l1", "flops", 0.5): [0.850],
}
# plan widths of hap+ni-lstsq at 50% params: seed 0 has none (an old record), seeds 1 and 2 do
WIDTHS = {1: {"model.layer2.0.shortcut.0": [32, 10, 2], "model.conv1": [16, 4, 1],
              "model.layer1.10.conv1": [16, 8, 0], "model.layer1.2.conv1": [16, 0, 0]},
          2: {"model.conv1": [16, 2, 0], "model.layer1.2.conv1": [16, 2, 0]}}


def _record(criterion: str, budget: str, target: float, seed: int, finetuned: float) -> dict:
    widths = WIDTHS.get(seed) if (criterion, budget, target) == ("hap+ni-lstsq", "params", 0.5) else None
    other = target - 0.2  # the budget not targeted moves less
    removed = {"params": target, "flops": other} if budget == "params" else {"params": other, "flops": target}
    return {
        "model": "resnet20", "criterion": criterion, "budget": budget, "target": target, "seed": seed,
        "preset": {"name": "tiny", "epochs": 1, "max_batches_per_epoch": 2, "batch_size": 8, "lr": 0.01,
                   "schedule": "cosine"},
        "device": "cpu",
        "params": {"before": 1000, "after": round(1000 * (1 - removed["params"])), "removed": removed["params"]},
        "flops": {"before": 5000, "after": round(5000 * (1 - removed["flops"])), "removed": removed["flops"]},
        "accuracy": {"dense": DENSE, "oneshot": finetuned - 0.1, "finetuned": finetuned, "eval_images": 100},
        "sensitivity_seconds": 1.5,
        "details": {} if widths is None else {"plan_widths": widths},
    }


def _write_records(results: Path, drop_widths: bool = False) -> Path:
    for (criterion, budget, target), accs in FINETUNED.items():
        for seed, acc in enumerate(accs):
            record = _record(criterion, budget, target, seed, acc)
            if drop_widths:
                record["details"] = {}
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


def _svg(path: Path) -> ET.Element:
    return ET.parse(path).getroot()


def _by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(NS + tag) if e.get("class") == cls]


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
    lstsq = dict(zip(header, _row(p50, "hap+ni-lstsq")))
    assert lstsq["fine-tuned acc %"] == "89.90 ± 0.10 (n=3)"
    assert lstsq["one-shot acc %"] == "79.90 ± 0.10 (n=3)"
    assert lstsq["fine-tuned change vs dense (pp)"] == "-0.10 ± 0.10"
    assert lstsq["params removed %"] == "50.00" and lstsq["FLOPs removed %"] == "30.00"
    l1 = dict(zip(header, _row(p50, "l1")))
    assert l1["fine-tuned acc %"] == "88.20 ± 0.20 (n=3)" and l1["fine-tuned change vs dense (pp)"] == "-1.80 ± 0.20"
    p70 = _section(text, "resnet20, p70")
    assert _row(p70, "hap+ni-lstsq")[5] == "-1.00 ± 0.28"
    f50 = _section(text, "resnet20, f50")
    assert _row(f50, "l1")[4:6] == ["85.00 (n=1)", "-5.00"]  # n = 1: no std
    # criteria in CRITERIA order, tables with parameter targets first
    assert text.index("## resnet20, p50") < text.index("## resnet20, p70") < text.index("## resnet20, f50")
    assert p50.index("| hap+ni-lstsq |") < p50.index("| l1 |")


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


def test_goal_verdicts(written):
    goals = _section((written / "README.md").read_text(encoding="utf-8"), "Goals: resnet20, budget `tiny`")
    assert _row(goals, "50%", "hap+ni-lstsq") == ["50%", "hap+ni-lstsq", "3", "-0.10 ± 0.10", "≥ -0.3", "met"]
    assert _row(goals, "70%", "hap+ni-lstsq") == ["70%", "hap+ni-lstsq", "2", "-1.00 ± 0.28", "≥ -0.8", "not met"]
    assert _row(goals, "50%", "hap+ni-zeros")[-1] == "no runs yet"
    assert _row(goals, "p50") == ["p50", "hap+ni-lstsq", "3", "89.90", "l1", "3", "88.20", "+1.70", "0.20", "met"]
    assert _row(goals, "p70") == ["p70", "hap+ni-lstsq", "2", "89.00", "l1", "2", "88.80", "+0.20", "0.28",
                                  "not met"]
    assert _row(goals, "f50") == ["f50", "hap+ni-lstsq", "1", "90.00", "l1", "1", "85.00", "+5.00", "-",
                                  "not enough seeds (n<2)"]


def test_line_plots(written):
    # hap+ni-lstsq: (accuracy % at 70% params removed, at 50%); both points sit left to right in that order
    for name, expected in (("acc_vs_params", (89.0, 89.9)), ("acc_vs_flops", (89.0, 89.9)),
                           ("oneshot_vs_params", (79.0, 79.9))):
        root = _svg(written / f"resnet20_tiny_{name}.svg")
        series = _by_class(root, "polyline", "series")
        assert len(series) == 2  # one per criterion
        assert [t.text for t in _by_class(root, "text", "legend")] == ["hap+ni-lstsq", "l1"]
        assert len(_by_class(root, "circle", "marker")) == 4 and len(_by_class(root, "line", "errbar")) == 4
        (hline,) = _by_class(root, "line", "hline")
        assert [t.text for t in _by_class(root, "text", "hline-label")] == ["dense 90.00%"]
        (x70, y70), (x50, y50) = [tuple(map(float, p.split(","))) for p in series[0].get("points").split()]
        assert x70 < x50
        # y pixel of an accuracy, from two y tick labels (drawn 4 px below their grid line)
        (a, ya), (b, yb) = sorted((float(t.text), float(t.get("y")) - 4) for t in _by_class(root, "text", "ytick"))[:2]
        assert [y70, y50] == pytest.approx([ya + (e - a) / (b - a) * (yb - ya) for e in expected], abs=0.02)
        assert float(hline.get("y1")) < min(y70, y50)  # dense is above the pruned accuracies


def test_plan_width_plot(written):
    root = _svg(written / "resnet20_tiny_plan_widths_p50.svg")
    bars = _by_class(root, "g", "bar")
    assert len(bars) == 4  # seed 1 (the lowest seed with plan widths), one bar per group
    assert [t.text for t in _by_class(root, "text", "xtick")] == ["conv1", "layer1.2.conv1", "layer1.10.conv1",
                                                                  "layer2.0.shortcut.0"]  # network order
    segments = [[(s.get("data-segment"), float(s.get("height"))) for s in bar.iter(NS + "rect")] for bar in bars]
    assert [[label for label, _ in bar] for bar in segments] == [["kept", "implanted", "removed"], ["kept"],
                                                                 ["kept", "removed"],
                                                                 ["kept", "implanted", "removed"]]
    unit = segments[1][0][1] / 16  # layer1.2.conv1: 16 kept
    assert [h / unit for _, h in segments[3]] == pytest.approx([20, 2, 10], abs=1e-3)
    assert [h / unit for _, h in segments[0]] == pytest.approx([11, 1, 4], abs=1e-3)
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
    root = _svg(tmp_path / "resnet20_tiny_plan_widths_p50.svg")
    assert len(_by_class(root, "g", "bar")) == 2
    assert "hap plan" in _by_class(root, "text", "title")[0].text
    goals = _section((tmp_path / "README.md").read_text(encoding="utf-8"), "Goals")
    assert _row(goals, "p50")[-1] == "no fine-tuned HAP+NI row"


def test_no_records(tmp_path):
    assert "No results yet" in sweep.tables(tmp_path)
    assert sweep.plots(tmp_path) == []


def test_short_names_and_order():
    assert sweep._short_names(["features.0", "features.10"]) == ["0", "10"]
    assert sweep._short_names(["conv1", "layer1.0.conv1"]) == ["conv1", "layer1.0.conv1"]
    assert sweep._short_names(["a.b", "a.b.c"]) == ["b", "b.c"]  # every name keeps a component
    names = ["features.10", "features.3", "features.0"]
    assert sorted(names, key=sweep._network_order) == ["features.0", "features.3", "features.10"]
