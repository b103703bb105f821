"""Figures for report pages, ``haprune explore`` and the benchmark pages, drawn with matplotlib.

matplotlib is an optional extra (``pip install 'haprune[plots]'``) imported only when a figure is drawn; without
it :func:`require_matplotlib` raises :class:`PlotsUnavailableError` saying how to install it. Figures are built on
matplotlib's object API (``Figure`` + the Agg canvas): no pyplot, no global backend switch, no display needed, so
importing haprune never changes the user's matplotlib state.

Every ``*_plot`` function returns a ``matplotlib.figure.Figure``; :func:`save_figure` writes it atomically (format
from the suffix: ``.png`` or ``.svg``, reproducible bytes: no date, fixed SVG ids) and :func:`data_uri` gives the
``data:`` URI a self-contained HTML page embeds.
"""
from __future__ import annotations

import base64
import io
import math
import os
from typing import TYPE_CHECKING, Mapping, Sequence

from ._fileio import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Point = tuple[float, float, float]  # x, y, error bar half-height (0: none)

# Okabe-Ito colour-blind-safe palette; line styles cycle after it so a dozen series stay apart
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
LINESTYLES = ("-", "--", ":")
WIDTH_COLOURS = {"kept": "#0072B2", "implanted": "#E69F00", "removed": "#D9D9D9"}
FORMATS = ("png", "svg")

__all__ = ["PlotsUnavailableError", "require_matplotlib", "line_plot", "stacked_bar_plot", "box_plot",
           "tradeoff_plot", "bar_plot", "save_figure", "figure_bytes", "data_uri", "PALETTE", "WIDTH_COLOURS"]


class PlotsUnavailableError(ImportError):
    """matplotlib is not installed (the optional extra ``haprune[plots]``)."""


def require_matplotlib() -> None:
    """Raise :class:`PlotsUnavailableError` with the install command when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotsUnavailableError("plots need matplotlib: pip install 'haprune[plots]' (or pip install "
                                    "matplotlib)") from None


def _figure(width: float = 7.6, height: float = 5.0, ncols: int = 1):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
    return fig, list(axes)


def _style(i: int) -> dict:
    return {"color": PALETTE[i % len(PALETTE)], "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)]}


def _hline(ax, hline: tuple[str, float] | None) -> None:
    if hline is not None:
        label, y = hline
        ax.axhline(y, color="#555555", linestyle="--", linewidth=1, label=label, gid="hline")


def line_plot(series: Mapping[str, Sequence[Point]], *, title: str, xlabel: str, ylabel: str,
              hline: tuple[str, float] | None = None, width: float = 7.6, height: float = 5.2) -> "Figure":
    """One line per series with markers and error bars (``(x, y, err)`` points, drawn in the order given), an
    optional dashed reference line ``hline = (label, y)`` (e.g. the dense model), a legend."""
    fig, (ax,) = _figure(width, height)
    for i, (name, points) in enumerate(series.items()):
        xs, ys, errs = zip(*points) if points else ((), (), ())
        yerr = list(errs) if any(e for e in errs) else None
        ax.errorbar(xs, ys, yerr=yerr, marker="o", markersize=5, capsize=3, linewidth=1.6, label=name,
                    gid=f"series-{i}", **_style(i))
    _hline(ax, hline)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if series or hline:
        ax.legend(fontsize=8)
    return fig


def stacked_bar_plot(categories: Sequence[str], stacks: Mapping[str, Sequence[float]], *, title: str, xlabel: str,
                     ylabel: str, colours: Mapping[str, str] | Sequence[str] | None = None,
                     width: float | None = None, height: float = 4.8) -> "Figure":
    """One bar per category, stacked bottom-up from the segments of ``stacks`` (segment label -> one value per
    category); ``colours`` per segment label, or in segment order; category labels rotated, thinned to about 60
    when there are more."""
    if colours is not None and not isinstance(colours, Mapping):
        colours = dict(zip(stacks, colours))
    n = len(categories)
    fig, (ax,) = _figure(width or min(16.0, max(6.0, 0.16 * n + 3)), height)
    bottom = [0.0] * n
    for i, (label, values) in enumerate(stacks.items()):
        if len(values) != n:
            raise ValueError(f"stack {label!r} has {len(values)} values for {n} categories")
        colour = (colours or {}).get(label, PALETTE[i % len(PALETTE)])
        ax.bar(range(n), values, bottom=bottom, color=colour, label=label, width=0.8, gid=f"segment-{label}")
        bottom = [b + v for b, v in zip(bottom, values)]
    step = max(1, math.ceil(n / 60))
    ax.set_xticks(range(0, n, step), [categories[k] for k in range(0, n, step)], rotation=90,
                  fontsize=7 if n > 20 else 9)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    return fig


def box_plot(stats: Mapping[str, Mapping[str, float]], *, title: str, xlabel: str, ylabel: str, log: bool = True,
             height: float = 4.8) -> "Figure":
    """One box per group from precomputed quantiles (``min``, ``q1``, ``median``, ``q3``, ``max``: whiskers at
    min and max), e.g. the distribution of each layer's sensitivity scores; ``log``: a log y axis (needs the
    minima positive: non-positive ones are drawn at the smallest positive value)."""
    names = list(stats)
    n = len(names)
    positive = [v for s in stats.values() for v in (s["min"], s["q1"], s["median"], s["q3"], s["max"]) if v > 0]
    floor = min(positive) if positive else 1.0
    fix = (lambda v: max(v, floor)) if log else (lambda v: v)  # noqa: E731
    boxes = [{"label": name, "whislo": fix(s["min"]), "q1": fix(s["q1"]), "med": fix(s["median"]),
              "q3": fix(s["q3"]), "whishi": fix(s["max"]), "fliers": []} for name, s in stats.items()]
    fig, (ax,) = _figure(min(16.0, max(6.0, 0.16 * n + 3)), height)
    if boxes:
        ax.bxp(boxes, positions=range(n), widths=0.6, medianprops={"color": PALETTE[3]})
    if log and positive:
        ax.set_yscale("log")
    step = max(1, math.ceil(n / 60))
    ax.set_xticks(range(0, n, step), [names[k] for k in range(0, n, step)], rotation=90,
                  fontsize=7 if n > 20 else 9)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


def bar_plot(values: Mapping[str, float], *, title: str, ylabel: str, errors: Mapping[str, tuple[float, float]]
             | None = None, width: float = 4.8, height: float = 3.6) -> "Figure":
    """One bar per entry (e.g. latency of the dense and the pruned model); ``errors``: (low, high) per entry."""
    names = list(values)
    fig, (ax,) = _figure(width, height)
    yerr = None
    if errors:
        yerr = [[values[n] - errors[n][0] for n in names], [errors[n][1] - values[n] for n in names]]
    ax.bar(names, [values[n] for n in names], yerr=yerr, capsize=4,
           color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
    ax.set(title=title, ylabel=ylabel)
    return fig


TRADEOFF_AXES = (("params", "parameters remaining (%)"), ("flops", "FLOPs remaining (%)"),
                 ("latency", "CPU latency remaining (%)"))


def tradeoff_plot(curves: Mapping[str, Sequence[Mapping[str, float]]], *, dense_accuracy: float, title: str,
                  ylabel: str = "accuracy (%)", targets: bool = True) -> "Figure":
    """Accuracy against parameters, FLOPs and latency remaining, one panel each, one line per criterion.

    ``curves``: label -> points, each a mapping with ``accuracy`` and ``params`` / ``flops`` / ``latency`` (the
    fraction remaining, 1 = dense; a panel is left out when no point has its key) and optionally ``target``
    (annotated beside the first curve's points). The dense model is the point (100 %, ``dense_accuracy``) and a
    dashed line in every panel. Accuracies and fractions are given as fractions and drawn in percent."""
    keys = [(k, label) for k, label in TRADEOFF_AXES
            if any(p.get(k) is not None for pts in curves.values() for p in pts)]
    fig, axes = _figure(4.2 * max(1, len(keys)) + 0.4, 4.4, ncols=max(1, len(keys)))
    for ax, (key, xlabel) in zip(axes, keys):
        for i, (name, points) in enumerate(curves.items()):
            # joined in target order (a noisy latency is not sorted into a false curve); by x without targets
            pts = sorted((p for p in points if p.get(key) is not None),
                         key=lambda p: (p.get("target") is None, p.get("target") or 0.0, p[key]))
            xs = [100 * p[key] for p in pts]
            ax.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", markersize=5, linewidth=1.6, label=name,
                    gid=f"curve-{key}-{i}", **_style(i))
            if targets and i == 0:
                for p, x in zip(pts, xs):
                    if p.get("target") is not None:
                        ax.annotate(f"{100 * p['target']:.0f}%", (x, 100 * p["accuracy"]), textcoords="offset points",
                                    xytext=(4, -10), fontsize=7, color="#444444")
        ax.plot([100.0], [100 * dense_accuracy], marker="*", markersize=12, color="#000000", linestyle="none",
                label="dense", gid=f"dense-{key}")
        ax.axhline(100 * dense_accuracy, color="#777777", linestyle="--", linewidth=0.9)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return fig


def figure_bytes(fig: "Figure", fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure's file content as PNG or SVG (reproducible: no creation date, fixed SVG element ids)."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {FORMATS}, got {fmt!r}")
    import matplotlib

    buf = io.BytesIO()
    fig.draw_without_rendering()  # settle the constrained layout first: every save of a figure is then the same
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "haprune", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
    return buf.getvalue()


def save_figure(fig: "Figure", path: str | os.PathLike[str], dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` atomically; the format is the suffix (``.png`` or ``.svg``)."""
    fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
    if fmt not in FORMATS:
        raise ValueError(f"save_figure writes .png or .svg files, got {os.fspath(path)!r}")
    atomic_write_bytes(path, figure_bytes(fig, fmt, dpi))


def data_uri(fig: "Figure", dpi: int = 110) -> str:
    """``data:image/png;base64,...`` of ``fig``, for an ``<img>`` of a self-contained page."""
    return "data:image/png;base64," + base64.b64encode(figure_bytes(fig, "png", dpi)).decode("ascii")
