"""haprune.plots (matplotlib, Agg canvas): each figure holds exactly the data it was given (lines, error bars,
stacked segments, boxes, the dense reference), files are written atomically with reproducible bytes, a missing
matplotlib gives the install command; and the benchmark pages (benchmarks/sweep.py) draw their figures with it."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from benchmarks_loader import load_benchmark

from haprune import plots

SERIES = {"hap": [(0.3, 89.0, 0.5), (0.5, 89.9, 0.0)], "l2 <&>": [(0.3, 88.0, 0.0), (0.5, 88.5, 0.0)]}


def _errorbars(ax):
    """label -> (x, y, half-heights of the error bars, or None) of each errorbar container of ``ax``."""
    out = {}
    for c in ax.containers:
        line, _, bars = c.lines
        err = None
        if bars:
            segs = bars[0].get_segments()
            err = [float(s[1][1] - s[0][1]) / 2 for s in segs]
        out[c.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), err)
    return out


def test_line_plot_holds_the_points_error_bars_and_reference():
    fig = plots.line_plot(SERIES, title="t", xlabel="x", ylabel="y", hline=("dense 90.00%", 90.0))
    (ax,) = fig.axes
    data = _errorbars(ax)
    assert data["hap"] == ([0.3, 0.5], [89.0, 89.9], [pytest.approx(0.5), 0.0])
    assert data["l2 <&>"] == ([0.3, 0.5], [88.0, 88.5], None)  # no error bar where every std is 0
    (hline,) = [ln for ln in ax.lines if ln.get_gid() == "hline"]
    assert list(hline.get_ydata()) == [90.0, 90.0]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["dense 90.00%", "hap", "l2 <&>"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("t", "x", "y")


def test_series_past_the_palette_change_line_style():
    series = {f"s{i}": [(0, i, 0), (1, i + 1, 0)] for i in range(len(plots.PALETTE) + 2)}
    ax = plots.line_plot(series, title="t", xlabel="x", ylabel="y").axes[0]
    styles = [c.lines[0].get_linestyle() for c in ax.containers]
    assert styles[: len(plots.PALETTE)] == ["-"] * len(plots.PALETTE) and styles[len(plots.PALETTE):] == ["--"] * 2


@pytest.mark.parametrize("series", [{}, {"one": [(1.0, 2.0, 0.0)]}, {"flat": [(1, 5, 0), (2, 5, 0)]}])
def test_degenerate_series_draw(series, tmp_path):
    plots.save_figure(plots.line_plot(series, title="t", xlabel="x", ylabel="y"), tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stacked_bars_stack_without_gaps():
    stacks = {"kept": [10, 16, 4], "implanted": [2, 0, 1], "removed": [4, 0, 3]}
    fig = plots.stacked_bar_plot(["a", "b", "c"], stacks, title="t", xlabel="x", ylabel="y",
                                 colours=("#0072B2", "#E69F00", "#D55E00"))
    ax = fig.axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == ["kept", "implanted", "removed"]
    bottom = np.zeros(3)
    for label, values in stacks.items():
        assert [p.get_height() for p in bars[label]] == values
        assert [p.get_y() for p in bars[label]] == pytest.approx(bottom.tolist())
        bottom += values
    assert bars["implanted"].patches[0].get_facecolor()[:3] == pytest.approx((0xE6 / 255, 0x9F / 255, 0))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_stacked_bars_thin_crowded_labels_and_reject_bad_input():
    names = [f"layer{i}" for i in range(130)]
    ax = plots.stacked_bar_plot(names, {"kept": [1] * 130}, title="t", xlabel="x", ylabel="y").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == names[::3] and len(labels) <= 60
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        plots.stacked_bar_plot(["a", "b", "c"], {"kept": [1, 2]}, title="t", xlabel="x", ylabel="y")


def test_box_plot_draws_the_given_quantiles():
    stats = {"conv1": {"min": 1.0, "q1": 2.0, "median": 3.0, "q3": 4.0, "max": 9.0},
             "fc": {"min": 0.0, "q1": 0.5, "median": 1.0, "q3": 1.5, "max": 2.0}}
    ax = plots.box_plot(stats, title="t", xlabel="x", ylabel="y").axes[0]
    assert ax.get_yscale() == "log"
    medians = [ln for ln in ax.lines if tuple(ln.get_color()[:3]) == tuple(int(plots.PALETTE[3][i:i + 2], 16) / 255
                                                                             for i in (1, 3, 5))
               or ln.get_color() == plots.PALETTE[3]]
    assert [ln.get_ydata()[0] for ln in medians] == [3.0, 1.0]
    ys = sorted({float(y) for ln in ax.lines for y in ln.get_ydata()})
    assert ys[0] == 0.5 and ys[-1] == 9.0  # a zero minimum is drawn at the smallest positive value on a log axis


def test_tradeoff_plot_has_a_panel_per_measure_and_the_dense_point():
    curves = {"hap": [{"params": 0.5, "flops": 0.6, "latency": 0.7, "accuracy": 0.90, "target": 0.5},
                      {"params": 0.3, "flops": 0.4, "latency": 0.5, "accuracy": 0.80, "target": 0.7}],
              "l2": [{"params": 0.5, "flops": 0.62, "latency": None, "accuracy": 0.85}]}
    fig = plots.tradeoff_plot(curves, dense_accuracy=0.95, title="t")
    assert [ax.get_xlabel() for ax in fig.axes] == [label for _, label in plots.TRADEOFF_AXES]
    params = fig.axes[0]
    (hap,) = [ln for ln in params.lines if ln.get_gid() == "curve-params-0"]
    # joined in target order (50% then 70% removed), not sorted by x: a noisy latency is not made into a curve
    assert list(hap.get_xdata()) == [50.0, 30.0] and list(hap.get_ydata()) == pytest.approx([90.0, 80.0])
    (dense,) = [ln for ln in params.lines if ln.get_gid() == "dense-params"]
    assert (dense.get_xdata()[0], dense.get_ydata()[0]) == (100.0, pytest.approx(95.0))
    (l2_latency,) = [ln for ln in fig.axes[2].lines if ln.get_gid() == "curve-latency-1"]
    assert len(l2_latency.get_xdata()) == 0  # the point without a latency is left out of that panel only
    no_latency = plots.tradeoff_plot({"l2": curves["l2"]}, dense_accuracy=0.95, title="t")
    assert len(no_latency.axes) == 2


def test_files_are_atomic_reproducible_and_typed(tmp_path, monkeypatch):
    fig = plots.line_plot(SERIES, title="t <b>", xlabel="x", ylabel="y")
    plots.save_figure(fig, tmp_path / "a.svg")
    plots.save_figure(fig, tmp_path / "b.svg")
    assert (tmp_path / "a.svg").read_bytes() == (tmp_path / "b.svg").read_bytes()  # no date, fixed ids
    root = ET.parse(tmp_path / "a.svg").getroot()  # valid XML, the title's markup escaped
    assert "t <b>" in "".join(root.itertext())
    assert plots.data_uri(fig).startswith("data:image/png;base64,iVBOR")
    with pytest.raises(ValueError, match=".png or .svg"):
        plots.save_figure(fig, tmp_path / "c.pdf")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(OSError):
        plots.save_figure(fig, tmp_path / "a.svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.svg"]  # no temp file, old file intact


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.PlotsUnavailableError, match=r"haprune\[plots\]"):
        plots.line_plot(SERIES, title="t", xlabel="x", ylabel="y")


# ---- the benchmark pages draw with haprune.plots (benchmarks/sweep.py), from the records' numbers

@pytest.fixture()
def sweep_figures(tmp_path, monkeypatch):
    """benchmarks/sweep.py's tables and figures from synthetic records; the figures captured by file name."""
    sweep = load_benchmark("sweep")
    figures = {}
    real = plots.save_figure

    def capture(fig, path, **kw):
        figures[path.name] = fig
        real(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", capture)
    record = {"model": "resnet20", "budget": "params", "seed": 0, "device": "cpu", "sensitivity_seconds": 1.0,
              "preset": {"name": "tiny", "epochs": 1, "max_batches_per_epoch": 2, "batch_size": 8, "lr": 0.01,
                         "schedule": "cosine"},
              "calibration": {"protocol": sweep.CALIBRATION_PROTOCOL, "seed": 0}, "spec": {}}
    for crit, target, acc in (("hap", 0.5, 0.89), ("hap", 0.7, 0.85), ("l2", 0.5, 0.87), ("l2", 0.7, 0.80)):
        r = {**record, "criterion": crit, "target": target,
             "params": {"before": 1000, "after": round(1000 * (1 - target)), "removed": target},
             "flops": {"before": 5000, "after": round(5000 * (1 - target + 0.1)), "removed": target - 0.1},
             "accuracy": {"dense": 0.9, "oneshot": acc - 0.1, "finetuned": acc, "eval_images": 100},
             "details": {"plan_widths": {"model.conv1": [16, 4, 1], "model.layer1.0.conv1": [16, 8, 0]}}
             if crit == "hap" else {}}
        path = tmp_path / "resnet20" / f"{sweep.run_id('tiny', crit, 'params', target, 0)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    sweep.write_tables(tmp_path)
    return tmp_path, figures


def test_sweep_draws_its_figures_with_matplotlib(sweep_figures):
    folder, figures = sweep_figures
    assert sorted(figures) == ["resnet20_tiny_acc_vs_flops.svg", "resnet20_tiny_acc_vs_params.svg",
                               "resnet20_tiny_oneshot_vs_params.svg", "resnet20_tiny_plan_widths_p50.svg",
                               "resnet20_tiny_plan_widths_p70.svg"]
    assert all(ET.parse(folder / name).getroot().tag.endswith("svg") for name in figures)  # the files, as named
    data = _errorbars(figures["resnet20_tiny_acc_vs_params.svg"].axes[0])
    # points in target order (50% then 70% removed): x = fraction of parameters remaining
    assert data["hap"][0] == pytest.approx([0.5, 0.3]) and data["hap"][1] == pytest.approx([89.0, 85.0])
    assert data["l2"][1] == pytest.approx([87.0, 80.0])
    widths = figures["resnet20_tiny_plan_widths_p50.svg"].axes[0]
    bars = {c.get_label(): [p.get_height() for p in c] for c in widths.containers}
    assert bars == {"kept": [11, 8], "implanted": [1, 0], "removed": [4, 8]}
    assert [t.get_text() for t in widths.get_xticklabels()] == ["conv1", "layer1.0.conv1"]
