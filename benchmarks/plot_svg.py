"""Dependency-free SVG plots for benchmark results (no matplotlib).

``line_plot`` draws one polyline per series with circle markers and vertical error bars (mean +- std),
"nice" axis ticks (1/2/5 x 10^k steps), a legend, axis labels, a title and an optional dashed reference
line. Series past the palette's length reuse its colours with a dash pattern, so a dozen series stay apart.
``stacked_bar_plot`` draws one bar per category, stacked bottom-up from several segments, with rotated and,
when there are too many to fit, thinned category labels. Both write the SVG atomically (temp file in the target
directory, then ``os.replace``). Elements carry classes (``series``, ``marker``, ``errbar``, ``hline``,
``legend``; ``bar``, ``segment``, ``xtick``) so tests can find them.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

Point = tuple[float, float, float]

# Okabe-Ito colour-blind-safe palette (black left out: it is the axis colour).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
# dash pattern of each pass through the palette ("" = solid)
DASHES = ("", "7 3", "2 2")


def _style(i: int) -> tuple[str, str]:
    """Stroke attributes (colour and dash pattern) of series ``i``."""
    colour, dash = PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]
    return colour, f'stroke="{colour}"' + (f' stroke-dasharray="{dash}"' if dash else "")


def _range(values: list[float], pad_frac: float = 0.05) -> tuple[float, float]:
    """Data range padded on both sides; never empty, so scaling never divides by zero."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    span = hi - lo
    pad = span * pad_frac if span > 0 else (abs(lo) * 0.05 or 0.5)
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], float]:
    """Tick values inside [lo, hi] on a 1/2/5 x 10^k step giving about ``target`` ticks, and the step."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs((hi - lo) / st - target))
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(int((hi - lo) / step) + 2)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks if t <= hi + step * 1e-9], step


def _fmt(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step)))
    return f"{value:.{decimals}f}" if decimals <= 6 else f"{value:.3g}"


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.2f}" y="{y:.2f}" text-anchor="{anchor}"{extra}>{escape(s)}</text>'


def _attr(s: str) -> str:
    """``s`` escaped for a double-quoted XML attribute value."""
    return escape(s, {'"': "&quot;"})


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def line_plot(series: dict[str, list[Point]], path: str | os.PathLike, *, title: str, xlabel: str,
              ylabel: str, width: int = 640, height: int = 420,
              hline: tuple[str, float] | None = None) -> None:
    """Write an SVG line plot of ``series`` (label -> ``(x, y_mean, y_std)`` points) to ``path``."""
    left, right, top, bottom = 70.0, 20.0, 40.0, 55.0
    pw, ph = width - left - right, height - top - bottom
    points = [p for pts in series.values() for p in pts]
    ys = [y + s * k for _, y, s in points for k in (-1, 1)] + ([hline[1]] if hline else [])
    x0, x1 = _range([p[0] for p in points])
    y0, y1 = _range(ys)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           _text(width / 2, top / 2 + 5, title, extra=' font-size="15" class="title"')]
    xticks, xstep = _ticks(x0, x1)
    for t in xticks:
        out.append(f'<line x1="{sx(t):.2f}" y1="{top}" x2="{sx(t):.2f}" y2="{top + ph}" stroke="#e5e5e5"/>')
        out.append(_text(sx(t), top + ph + 16, _fmt(t, xstep), extra=' class="xtick"'))
    yticks, ystep = _ticks(y0, y1)
    for t in yticks:
        out.append(f'<line x1="{left}" y1="{sy(t):.2f}" x2="{left + pw}" y2="{sy(t):.2f}" stroke="#e5e5e5"/>')
        out.append(_text(left - 6, sy(t) + 4, _fmt(t, ystep), "end", ' class="ytick"'))
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(_text(left + pw / 2, height - 12, xlabel, extra=' class="xlabel"'))
    cy = top + ph / 2
    out.append(_text(16, cy, ylabel, extra=f' transform="rotate(-90 16 {cy:.2f})" class="ylabel"'))
    if hline is not None:
        label, value = hline
        out.append(f'<line class="hline" x1="{left}" y1="{sy(value):.2f}" x2="{left + pw}" y2="{sy(value):.2f}" '
                   'stroke="#555555" stroke-dasharray="6 4"/>')
        out.append(_text(left + pw - 4, sy(value) - 4, label, "end", ' fill="#555555" class="hline-label"'))
    for i, (label, pts) in enumerate(series.items()):
        colour, stroke = _style(i)
        pts = sorted(pts, key=lambda p: p[0])
        coords = " ".join(f"{sx(x):.2f},{sy(y):.2f}" for x, y, _ in pts)
        out.append(f'<polyline class="series" points="{coords}" fill="none" {stroke} stroke-width="2"/>')
        for x, y, s in pts:
            if s > 0:
                out.append(f'<line class="errbar" x1="{sx(x):.2f}" y1="{sy(y - s):.2f}" x2="{sx(x):.2f}" '
                           f'y2="{sy(y + s):.2f}" stroke="{colour}" stroke-width="1.5"/>')
            out.append(f'<circle class="marker" cx="{sx(x):.2f}" cy="{sy(y):.2f}" r="3.5" fill="{colour}"/>')
    if series:  # legend box in the plot corner that covers the fewest markers, drawn over the data
        lw, lh = 46 + 7 * max(len(label) for label in series), 18 * len(series) + 6
        marks = [(sx(x), sy(y)) for x, y, _ in points]
        corners = [(left + 6, top + 6), (left + pw - 6 - lw, top + 6),
                   (left + 6, top + ph - 6 - lh), (left + pw - 6 - lw, top + ph - 6 - lh)]
        bx, by = min(corners, key=lambda c: sum(c[0] <= mx <= c[0] + lw and c[1] <= my <= c[1] + lh
                                                 for mx, my in marks))
        out.append(f'<rect x="{bx}" y="{by}" width="{lw}" height="{lh}" fill="white" fill-opacity="0.85" '
                   'stroke="#cccccc"/>')
        for i, label in enumerate(series):
            ly = by + 16 + 18 * i
            out.append(f'<line x1="{bx + 8}" y1="{ly - 4}" x2="{bx + 28}" y2="{ly - 4}" {_style(i)[1]} '
                       'stroke-width="2"/>')
            out.append(_text(bx + 34, ly, label, "start", ' class="legend"'))
    out.append("</svg>")
    _write_atomic(Path(path), "\n".join(out) + "\n")


def stacked_bar_plot(categories: list[str], stacks: dict[str, list[float]], path: str | os.PathLike, *,
                     title: str, xlabel: str, ylabel: str, width: int = 760, height: int = 440,
                     colours: tuple[str, ...] = PALETTE) -> None:
    """Write an SVG with one bar per category to ``path``, stacked bottom-up in the order of ``stacks``.

    ``stacks`` maps a segment label to one non-negative value per category (in ``categories`` order); segment
    ``j`` is filled with ``colours[j]``. Each bar is a ``<g class="bar">`` holding a tooltip ``<title>`` and one
    ``<rect class="segment" data-segment=LABEL>`` per non-zero segment; the y axis starts at 0. Category labels
    are rotated by 45 degrees and, past about one per 13 pixels of plot width, only every k-th one is written.
    """
    if not categories:
        raise ValueError("stacked_bar_plot: no categories to draw")
    if len(colours) < len(stacks):
        raise ValueError(f"stacked_bar_plot: {len(stacks)} segments but {len(colours)} colours")
    for label, values in stacks.items():
        if len(values) != len(categories):
            raise ValueError(f"stacked_bar_plot: segment {label!r} has {len(values)} values, "
                             f"{len(categories)} categories")
        if any(v < 0 for v in values):
            raise ValueError(f"stacked_bar_plot: segment {label!r} has a negative value")
    longest = max(len(c) for c in categories)
    left, right, top = 70.0, 20.0, 62.0
    bottom = 42.0 + math.ceil(4.6 * longest)  # room for the 45-degree labels and the axis label
    pw, ph = width - left - right, height - top - bottom
    totals = [sum(values[i] for values in stacks.values()) for i in range(len(categories))]
    y1 = max(totals) * 1.05 or 1.0

    def sy(y: float) -> float:
        return top + (y1 - y) / y1 * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           _text(width / 2, 22, title, extra=' font-size="15" class="title"')]
    lx = left
    for j, label in enumerate(stacks):  # legend: one row between the title and the plot
        out.append(f'<rect class="legend-swatch" x="{lx:.2f}" y="{top - 24}" width="12" height="12" '
                   f'fill="{colours[j]}"/>')
        out.append(_text(lx + 16, top - 14, label, "start", ' class="legend"'))
        lx += 40 + 7 * len(label)
    yticks, ystep = _ticks(0.0, y1)
    for t in yticks:
        out.append(f'<line x1="{left}" y1="{sy(t):.2f}" x2="{left + pw}" y2="{sy(t):.2f}" stroke="#e5e5e5"/>')
        out.append(_text(left - 6, sy(t) + 4, _fmt(t, ystep), "end", ' class="ytick"'))
    slot = pw / len(categories)
    every = math.ceil(len(categories) / max(1, int(pw // 13)))
    for i, category in enumerate(categories):
        x = left + i * slot + 0.1 * slot
        tip = ", ".join(f"{label} {_num(values[i])}" for label, values in stacks.items())
        out.append(f'<g class="bar"><title>{escape(f"{category}: {tip}")}</title>')
        base = 0.0
        for j, (label, values) in enumerate(stacks.items()):
            if values[i] > 0:
                out.append(f'<rect class="segment" data-segment="{_attr(label)}" x="{x:.2f}" '
                           f'y="{sy(base + values[i]):.2f}" width="{0.8 * slot:.2f}" '
                           f'height="{sy(base) - sy(base + values[i]):.2f}" fill="{colours[j]}"/>')
            base += values[i]
        out.append("</g>")
        if i % every == 0:
            cx, cy = left + (i + 0.5) * slot, top + ph + 12
            out.append(_text(cx, cy, category, "end", f' font-size="11" transform="rotate(-45 {cx:.2f} {cy:.2f})" '
                                                      'class="xtick"'))
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    out.append(_text(left + pw / 2, height - 10, xlabel, extra=' class="xlabel"'))
    cy = top + ph / 2
    out.append(_text(16, cy, ylabel, extra=f' transform="rotate(-90 16 {cy:.2f})" class="ylabel"'))
    out.append("</svg>")
    _write_atomic(Path(path), "\n".join(out) + "\n")


def _num(value: float) -> str:
    """A value for a tooltip: integers without a decimal point."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
