"""Server-rendered SVG charts for the dashboard. Pure: data in, markup out; no JavaScript.

Every text that reaches the markup is escaped here, so a survey or segment name cannot inject
markup into the dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Point:
    label: str  # the period, e.g. "2026-11-16"
    value: float | None  # None: no answers in the period
    low: float | None = None  # the 95% interval
    high: float | None = None
    n: int = 0


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def trend(
    points: Sequence[Point],
    *,
    domain: tuple[float, float],
    target: float | None = None,
    title: str,
    width: int = 560,
    height: int = 200,
) -> str:
    """A line of the score per period with its 95% interval as a band, and the target as a
    dashed line. Periods without answers leave a gap."""
    left, right, top, bottom = 40, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = domain
    span = (hi - lo) or 1.0

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / max(len(points), 1))

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + plot_h * (1 - (v - lo) / span)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="{escape(title)}" class="chart">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in (lo, (lo + hi) / 2, hi):
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{_fmt(y(tick))}" y2="{_fmt(y(tick))}" '
            f'class="grid"/><text x="{left - 6}" y="{_fmt(y(tick) + 4)}" class="tick" '
            f'text-anchor="end">{tick:g}</text>'
        )
    # The interval band, one polygon per run of periods with an interval.
    run: list[int] = []
    runs: list[list[int]] = []
    for i, p in enumerate(points):
        if p.low is not None and p.high is not None:
            run.append(i)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    for r in runs:
        upper = [f"{_fmt(x(i))},{_fmt(y(points[i].high or 0))}" for i in r]
        lower = [f"{_fmt(x(i))},{_fmt(y(points[i].low or 0))}" for i in reversed(r)]
        parts.append(f'<polygon points="{" ".join(upper + lower)}" class="band"/>')
    if target is not None and lo <= target <= hi:
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{_fmt(y(target))}" '
            f'y2="{_fmt(y(target))}" class="target"/>'
            f'<text x="{width - right}" y="{_fmt(y(target) - 4)}" class="tick" '
            f'text-anchor="end">target {target:g}</text>'
        )
    segment: list[str] = []
    for i, p in enumerate(points):
        if p.value is None:
            if len(segment) > 1:
                parts.append(f'<polyline points="{" ".join(segment)}" class="line"/>')
            segment = []
            continue
        segment.append(f"{_fmt(x(i))},{_fmt(y(p.value))}")
        parts.append(
            f'<circle cx="{_fmt(x(i))}" cy="{_fmt(y(p.value))}" r="3" class="dot">'
            f"<title>{escape(p.label)}: {p.value:.1f} (n={p.n})</title></circle>"
        )
    if len(segment) > 1:
        parts.append(f'<polyline points="{" ".join(segment)}" class="line"/>')
    step = max(1, len(points) // 6)
    for i, p in enumerate(points):
        if i % step == 0:
            parts.append(
                f'<text x="{_fmt(x(i))}" y="{height - 8}" class="tick" '
                f'text-anchor="middle">{escape(p.label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
