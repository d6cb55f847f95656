"""Inline SVG for the report: no script, no external file, so a report opens anywhere and stays as
it was made. Every text that goes into the SVG is escaped by the caller's ``esc``; numbers are
formatted here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from html import escape as esc


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as a person reads it: 4 significant digits, '–' for none, NaN and infinities named."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _finite(*values: float | None) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def interval_strip(estimate: float | None, lower: float | None, upper: float | None, margin: float,
                   width: int = 180, height: int = 18) -> str:  # fmt: skip
    """One metric at a glance: its confidence interval (grey bar), estimate (dot) and margin (red
    tick). Left of the tick is within the margin; an interval wholly right of it is a confident fail."""
    known = _finite(estimate, lower, upper, margin)
    lo, hi = min(known), max(known)
    pad = (hi - lo) * 0.08 or max(abs(hi), 1.0) * 0.08
    lo, hi = lo - pad, hi + pad

    def x(v: float) -> float:
        return 4 + (width - 8) * (v - lo) / (hi - lo)

    mid = height / 2
    parts = [f'<svg class="strip" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f"<title>estimate {fmt(estimate)}, interval [{fmt(lower)}, {fmt(upper)}], margin {fmt(margin)}</title>"]
    left = x(lower) if lower is not None and math.isfinite(lower) else 0.0
    right = x(upper) if upper is not None and math.isfinite(upper) else float(width)
    parts.append(f'<line x1="{left:.1f}" y1="{mid}" x2="{right:.1f}" y2="{mid}" stroke="#999" stroke-width="4"/>')
    if math.isfinite(margin):
        parts.append(f'<line x1="{x(margin):.1f}" y1="1" x2="{x(margin):.1f}" y2="{height - 1}" stroke="#c62828" '
                     'stroke-width="2"/>')  # fmt: skip
    if estimate is not None and math.isfinite(estimate):
        parts.append(f'<circle cx="{x(estimate):.1f}" cy="{mid}" r="4" fill="#222"/>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(times: Sequence[datetime], series: Sequence[tuple[str, str, Sequence[float | None]]], title: str,
               reference: tuple[str, float] | None = None, width: int = 720, height: int = 200) -> str:  # fmt: skip
    """Series over the windows (oldest left): (name, colour, values); a gap where a value is None.
    ``reference``: a labelled horizontal line (a margin). Axis labels: the range and the first and
    last window's start."""
    values = [v for _, _, vs in series for v in vs if v is not None and math.isfinite(v)]
    if reference is not None and math.isfinite(reference[1]):
        values.append(reference[1])
    if not times or not values:
        return f'<p class="muted">{esc(title)}: no closed window yet.</p>'
    lo, hi = min(0.0, min(values)), max(values)
    hi = hi if hi > lo else lo + 1.0
    left, right, top, bottom = 56, width - 8, 40, height - 22
    n = len(times)

    def x(i: int) -> float:
        return left + (right - left) * (i / (n - 1) if n > 1 else 0.5)

    def y(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f"<title>{esc(title)}</title>",
             f'<text x="{left}" y="14" class="ct">{esc(title)}</text>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#bbb"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#bbb"/>',
             f'<text x="{left - 4}" y="{top + 4}" class="ax" text-anchor="end">{fmt(hi, 3)}</text>',
             f'<text x="{left - 4}" y="{bottom}" class="ax" text-anchor="end">{fmt(lo, 3)}</text>',
             f'<text x="{left}" y="{height - 6}" class="ax">{esc(_stamp(times[0]))}</text>',
             f'<text x="{right}" y="{height - 6}" class="ax" text-anchor="end">{esc(_stamp(times[-1]))}</text>']
    if reference is not None and math.isfinite(reference[1]):
        ry = y(reference[1])
        parts.append(f'<line x1="{left}" y1="{ry:.1f}" x2="{right}" y2="{ry:.1f}" stroke="#c62828" '
                     'stroke-dasharray="4 3"/>')  # fmt: skip
        parts.append(f'<text x="{right}" y="{ry - 3:.1f}" class="ax" text-anchor="end" fill="#c62828">'
                     f"{esc(reference[0])} {fmt(reference[1], 3)}</text>")  # fmt: skip
    legend_x = left
    for name, colour, vs in series:
        for run in _runs(vs):
            if len(run) == 1:
                i, v = run[0]
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2" fill="{colour}"/>')
            else:
                points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in run)
                parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(f'<text x="{legend_x}" y="30" class="ax" fill="{colour}">■ {esc(name)}</text>')
        legend_x += 16 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def _runs(values: Sequence[float | None]) -> list[list[tuple[int, float]]]:
    """Consecutive finite values as (index, value) runs: a missing window breaks the line."""
    runs: list[list[tuple[int, float]]] = [[]]
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((i, v))
    return [r for r in runs if r]


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
