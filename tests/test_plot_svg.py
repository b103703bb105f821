"""benchmarks/plot_svg.py: the SVG parses, draws one polyline per series, puts larger y higher, draws error bars
only where std > 0, escapes labels, survives degenerate data and labels the reference line; stacked bars are
proportional to their values, stack without gaps, thin out crowded labels and are written atomically."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from benchmarks_loader import load_benchmark

NS = "{http://www.w3.org/2000/svg}"




plot_svg = load_benchmark("plot_svg")


def _plot(tmp_path: Path, series, **kwargs) -> ET.Element:
    path = tmp_path / "plot.svg"
    plot_svg.line_plot(series, path, title=kwargs.pop("title", "t"), xlabel="x", ylabel="y", **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.svg"]  # no temp file left behind
    return ET.parse(path).getroot()


def _by_class(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(NS + tag) if e.get("class") == cls]


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, pair.split(","))) for pair in polyline.get("points").split()]


def test_parses_with_one_polyline_per_series(tmp_path):
    series = {"hap": [(0.3, 90.0, 0.5), (0.5, 88.0, 0.7), (0.7, 80.0, 1.0)],
              "l1": [(0.3, 89.0, 0.4), (0.5, 85.0, 0.6)]}
    root = _plot(tmp_path, series)
    assert root.tag == NS + "svg"
    lines = _by_class(root, "polyline", "series")
    assert [len(_points(p)) for p in lines] == [3, 2]
    assert len({p.get("stroke") for p in lines}) == 2  # distinct colours
    assert len(_by_class(root, "circle", "marker")) == 5
    assert [t.text for t in _by_class(root, "text", "legend")] == ["hap", "l1"]
    assert _by_class(root, "text", "title")[0].text == "t"
    assert len(_by_class(root, "text", "xtick")) >= 2 and len(_by_class(root, "text", "ytick")) >= 2


def test_larger_y_is_drawn_higher(tmp_path):
    root = _plot(tmp_path, {"s": [(1.0, 10.0, 0.0), (2.0, 20.0, 0.0), (3.0, 15.0, 0.0)]})
    (_, y10), (_, y20), (_, y15) = _points(_by_class(root, "polyline", "series")[0])
    assert y20 < y15 < y10


def test_error_bars_only_where_std_positive(tmp_path):
    root = _plot(tmp_path, {"s": [(1.0, 10.0, 0.0), (2.0, 20.0, 2.0), (3.0, 15.0, 0.0)]})
    bars = _by_class(root, "line", "errbar")
    assert len(bars) == 1
    (x2, y2) = _points(_by_class(root, "polyline", "series")[0])[1]
    bar = bars[0]
    assert float(bar.get("x1")) == pytest.approx(x2) == pytest.approx(float(bar.get("x2")))
    lo, hi = sorted((float(bar.get("y1")), float(bar.get("y2"))))
    assert lo < y2 < hi


def test_special_characters_are_escaped(tmp_path):
    label = "a<b & c>d"
    root = _plot(tmp_path, {label: [(1.0, 1.0, 0.1), (2.0, 2.0, 0.1)]}, title="<&>")
    assert "a&lt;b &amp; c&gt;d" in (tmp_path / "plot.svg").read_text(encoding="utf-8")
    assert [t.text for t in _by_class(root, "text", "legend")] == [label]
    assert _by_class(root, "text", "title")[0].text == "<&>"


@pytest.mark.parametrize("series", [
    {"one": [(0.5, 80.0, 0.0)]},
    {"flat": [(0.1, 5.0, 0.0), (0.2, 5.0, 0.0), (0.3, 5.0, 0.0)]},
    {"zero": [(0.0, 0.0, 0.0)]},
    {"same-x": [(1.0, 2.0, 0.0), (1.0, 3.0, 0.0)]},
])
def test_degenerate_series_do_not_crash(tmp_path, series):
    root = _plot(tmp_path, series)
    for x, y in _points(_by_class(root, "polyline", "series")[0]):
        assert 0 <= x <= 640 and 0 <= y <= 420


def test_hline_label_appears(tmp_path):
    root = _plot(tmp_path, {"s": [(0.3, 70.0, 1.0), (0.6, 60.0, 1.0)]}, hline=("dense <ref>", 80.1))
    assert [t.text for t in _by_class(root, "text", "hline-label")] == ["dense <ref>"]
    (line,) = _by_class(root, "line", "hline")
    assert line.get("stroke-dasharray")
    # the reference line is above every data point (80.1 > 71), inside the plot
    assert float(line.get("y1")) < min(y for _, y in _points(_by_class(root, "polyline", "series")[0]))
    assert float(line.get("y1")) > 0


def test_ticks_are_nice(tmp_path):
    root = _plot(tmp_path, {"s": [(0.27, 59.3, 0.0), (0.73, 81.2, 0.0)]})
    for cls in ("xtick", "ytick"):
        values = [float(t.text) for t in _by_class(root, "text", cls)]
        steps = {round(b - a, 9) for a, b in zip(values, values[1:])}
        assert len(values) >= 3 and len(steps) == 1
        (step,) = steps
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert round(mantissa, 6) in (1.0, 2.0, 5.0)
        assert all(abs(v / step - round(v / step)) < 1e-6 for v in values)


def test_series_past_the_palette_are_dashed(tmp_path):
    n = len(plot_svg.PALETTE) + 1
    root = _plot(tmp_path, {f"s{i}": [(0.0, float(i), 0.0), (1.0, float(i), 0.0)] for i in range(n)})
    lines = _by_class(root, "polyline", "series")
    assert [line.get("stroke-dasharray") for line in lines] == [None] * (n - 1) + ["7 3"]
    assert lines[-1].get("stroke") == lines[0].get("stroke")
    legend_samples = [e for e in root.iter(NS + "line") if e.get("stroke") == lines[0].get("stroke")]
    assert [e.get("stroke-dasharray") for e in legend_samples] == [None, "7 3"]


def _bars(tmp_path: Path, categories, stacks, **kwargs) -> ET.Element:
    path = tmp_path / "bars.svg"
    plot_svg.stacked_bar_plot(categories, stacks, path, title="t", xlabel="x", ylabel="y", **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["bars.svg"]  # no temp file left behind
    return ET.parse(path).getroot()


def _segments(bar: ET.Element) -> list[tuple[str, float, float]]:
    """(label, top y, height) of each segment of a bar, bottom-up."""
    return [(r.get("data-segment"), float(r.get("y")), float(r.get("height"))) for r in bar.iter(NS + "rect")]


def test_stacked_bar_heights_are_proportional(tmp_path):
    stacks = {"kept": [10.0, 4.0, 0.0], "implanted": [2.0, 0.0, 0.0], "removed": [4.0, 4.0, 3.0]}
    root = _bars(tmp_path, ["a", "b", "c"], stacks)
    bars = _by_class(root, "g", "bar")
    assert len(bars) == 3
    segments = [_segments(b) for b in bars]
    assert [[label for label, _, _ in s] for s in segments] == [["kept", "implanted", "removed"],
                                                                ["kept", "removed"], ["removed"]]
    unit = segments[0][0][2] / 10.0
    assert [h / unit for s in segments for _, _, h in s] == pytest.approx([10, 2, 4, 4, 4, 3], abs=1e-3)
    for s in segments:  # stacked without gaps: each segment starts where the one below it ends
        for (_, top_below, _), (_, top, height) in zip(s, s[1:]):
            assert top + height == pytest.approx(top_below, abs=0.02)
    baseline = segments[0][0][1] + segments[0][0][2]
    assert all(s[0][1] + s[0][2] == pytest.approx(baseline, abs=0.02) for s in segments)  # y axis starts at 0
    fills = {r.get("data-segment"): r.get("fill") for b in bars for r in b.iter(NS + "rect")}
    assert [fills[k] for k in stacks] == list(plot_svg.PALETTE[:3])
    assert [t.text for t in _by_class(root, "text", "legend")] == list(stacks)
    assert [t.text for t in _by_class(root, "text", "xtick")] == ["a", "b", "c"]
    assert bars[0].find(NS + "title").text == "a: kept 10, implanted 2, removed 4"


def test_stacked_bar_thins_crowded_labels(tmp_path):
    names = [f"layer{i // 9 + 1}.{i % 9}.conv1" for i in range(120)]
    root = _bars(tmp_path, names, {"kept": [1.0] * 120})
    assert len(_by_class(root, "g", "bar")) == 120
    labels = [t.text for t in _by_class(root, "text", "xtick")]
    assert 10 <= len(labels) < 120 and labels[0] == names[0] and set(labels) <= set(names)
    assert all("rotate(-45" in t.get("transform") for t in _by_class(root, "text", "xtick"))
    for e in root.iter():  # everything is anchored inside the canvas
        for attr, size in (("x", 760), ("y", 440)):
            if e.get(attr) is not None:
                assert 0 <= float(e.get(attr)) <= size


def test_stacked_bar_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "bars.svg"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(plot_svg.os, "replace", fail)
    with pytest.raises(OSError):
        plot_svg.stacked_bar_plot(["a"], {"kept": [1.0]}, path, title="t", xlabel="x", ylabel="y")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["bars.svg"]


@pytest.mark.parametrize("categories, stacks", [
    ([], {"kept": []}),
    (["a", "b"], {"kept": [1.0]}),
    (["a"], {"kept": [-1.0]}),
])
def test_stacked_bar_rejects_bad_input(tmp_path, categories, stacks):
    with pytest.raises(ValueError):
        plot_svg.stacked_bar_plot(categories, stacks, tmp_path / "bars.svg", title="t", xlabel="x", ylabel="y")
    assert not list(tmp_path.iterdir())
