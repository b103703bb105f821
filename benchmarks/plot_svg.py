"""Dependency-free SVG line plots for benchmark results (no matplotlib).

``line_plot`` draws one polyline per series with circle markers and vertical error bars (mean +- std),
"nice" axis ticks (1/2/5 x 10^k steps), a legend, axis labels, a title and an optional dashed reference
line, and writes the SVG atomically (temp file in the target directory, then ``os.replace``).
Elements carry classes (``series``, ``marker``, ``errbar``, ``hline``, ``legend``) so tests can find them.
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
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts, key=lambda p: p[0])
        coords = " ".join(f"{sx(x):.2f},{sy(y):.2f}" for x, y, _ in pts)
        out.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
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
            out.append(f'<line x1="{bx + 8}" y1="{ly - 4}" x2="{bx + 28}" y2="{ly - 4}" '
                       f'stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2"/>')
            out.append(_text(bx + 34, ly, label, "start", ' class="legend"'))
    out.append("</svg>")
    _write_atomic(Path(path), "\n".join(out) + "\n")
