"""Small inline-SVG charts for the HTML report: pure string building, no plotting dependency.

Why not matplotlib: the report must be one self-contained file rendered by the CLI and the service
alike; four chart shapes (grouped bars, stacked bars, a scatter, lines) are ~150 lines of SVG, while
matplotlib would add a 40 MB dependency (and font caching on first use) to every install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948")
FONT = 'font-family="system-ui, sans-serif" font-size="12"'
ROW = 18  # px per bar row


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


def _fmt(v: float) -> str:
    """Compact numbers for axis ticks and labels: 1.2k, 3.4M, 0.012."""
    a = abs(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" {FONT}><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def _legend(series: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, name in enumerate(series):
        out.append(f'<rect x="{x + i * 130:.1f}" y="{y - 10:.1f}" width="10" height="10" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"/><text x="{x + i * 130 + 14:.1f}" y="{y:.1f}">'
                   f'{escape(name)}</text>')
    return out


def _label(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def grouped_bars(title: str, labels: Sequence[str], series: Sequence[Series], width: int = 560) -> str:
    """One row per label, one bar per series, each row scaled to its own largest value (before/after of
    quantities with different units side by side); the value is printed at the bar's end."""
    left, right = 90, 70
    span = width - left - right
    per = len(series)
    row_h = per * 14 + 10
    body = _legend([s.name for s in series], left, 14)
    for r, label in enumerate(labels):
        y0 = 26 + r * row_h
        top = max((s.values[r] or 0.0 for s in series), default=0.0) or 1.0
        body.append(f'<text x="{left - 6}" y="{y0 + row_h / 2:.1f}" text-anchor="end">{escape(label)}</text>')
        for i, s in enumerate(series):
            v = s.values[r]
            y = y0 + i * 14
            if v is None:
                body.append(f'<text x="{left + 2}" y="{y + 11}" fill="#888">n/a</text>')
                continue
            w = max(1.0, span * v / top)
            body.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="12" fill="{PALETTE[i % len(PALETTE)]}">'
                        f'<title>{escape(s.name)}: {v:,.6g}</title></rect>'
                        f'<text x="{left + w + 4:.1f}" y="{y + 10}">{_fmt(v)}</text>')
    return _svg(width, 30 + len(labels) * row_h, title, body)


def stacked_bars(title: str, labels: Sequence[str], kept: Sequence[int], removed: Sequence[int],
                 width: int = 560) -> str:
    """Kept (blue) and removed (orange) units per row, on one scale, so wide layers look wide."""
    left, right = 200, 60
    span = width - left - right
    top = max((k + r for k, r in zip(kept, removed, strict=True)), default=1) or 1
    body = _legend(["kept", "removed"], left, 14)
    for i, (label, k, r) in enumerate(zip(labels, kept, removed, strict=True)):
        y = 24 + i * ROW
        wk, wr = span * k / top, span * r / top
        body.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{escape(_label(label))}'
                    f'<title>{escape(label)}</title></text>'
                    f'<rect x="{left}" y="{y}" width="{wk:.1f}" height="13" fill="{PALETTE[0]}">'
                    f'<title>kept {k}</title></rect>'
                    f'<rect x="{left + wk:.1f}" y="{y}" width="{wr:.1f}" height="13" fill="{PALETTE[1]}">'
                    f'<title>removed {r}</title></rect>'
                    f'<text x="{left + wk + wr + 4:.1f}" y="{y + 11}">{r}/{k + r}</text>')
    return _svg(width, 30 + len(labels) * ROW, title, body)


def _log_axis(lo: float, hi: float) -> tuple[float, float]:
    return math.floor(math.log10(lo)), math.ceil(math.log10(hi)) or 1


def scatter(title: str, points: Sequence[tuple[float, float, str]], x_name: str, y_name: str,
            size: int = 360) -> str:
    """Log-log scatter with the y = x diagonal: points on it were predicted right, points above it were
    worse than predicted. Non-positive values are clipped to the smallest positive one."""
    pad = 52
    positive = [v for x, y, _ in points for v in (x, y) if v > 0] or [1e-6, 1.0]
    lo, hi = _log_axis(min(positive), max(positive))
    if hi <= lo:
        hi = lo + 1
    span = size - 2 * pad

    def pos(v: float) -> float:
        return span * (math.log10(max(v, min(positive))) - lo) / (hi - lo)

    body = [f'<rect x="{pad}" y="{pad / 2}" width="{span}" height="{span}" fill="none" stroke="#ccc"/>',
            f'<line x1="{pad}" y1="{pad / 2 + span}" x2="{pad + span}" y2="{pad / 2}" stroke="#bbb" '
            f'stroke-dasharray="4 3"/>']
    for e in range(int(lo), int(hi) + 1):
        t = span * (e - lo) / (hi - lo)
        body.append(f'<text x="{pad + t:.1f}" y="{pad / 2 + span + 14}" text-anchor="middle">1e{e}</text>'
                    f'<text x="{pad - 4}" y="{pad / 2 + span - t + 4:.1f}" text-anchor="end">1e{e}</text>')
    for x, y, name in points:
        body.append(f'<circle cx="{pad + pos(x):.1f}" cy="{pad / 2 + span - pos(y):.1f}" r="3.5" '
                    f'fill="{PALETTE[0]}" fill-opacity="0.7"><title>{escape(name)}: {x:.3g} → {y:.3g}</title>'
                    '</circle>')
    body.append(f'<text x="{pad + span / 2}" y="{size - 6}" text-anchor="middle">{escape(x_name)}</text>'
                f'<text transform="translate(12 {pad / 2 + span / 2}) rotate(-90)" text-anchor="middle">'
                f'{escape(y_name)}</text>')
    return _svg(size, size, title, body)


def lines(title: str, x: Sequence[float], series: Sequence[Series], x_name: str, width: int = 560,
          height: int = 260) -> str:
    """Curves on a log y axis (losses span decades); gaps where a value is missing."""
    pad_l, pad_r, pad_t, pad_b = 56, 16, 24, 36
    ys = [v for s in series for v in s.values if v is not None and v > 0] or [1e-6, 1.0]
    lo, hi = _log_axis(min(ys), max(ys))
    if hi <= lo:
        hi = lo + 1
    x0, x1 = (min(x), max(x)) if x else (0.0, 1.0)
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def px(v: float) -> float:
        return pad_l + w * (v - x0) / ((x1 - x0) or 1.0)

    def py(v: float) -> float:
        return pad_t + h - h * (math.log10(v) - lo) / (hi - lo)

    body = [f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>']
    body += _legend([s.name for s in series], pad_l, 14)
    for e in range(int(lo), int(hi) + 1):
        body.append(f'<text x="{pad_l - 4}" y="{py(10.0**e) + 4:.1f}" text-anchor="end">1e{e}</text>')
    for v in (x0, (x0 + x1) / 2, x1):
        body.append(f'<text x="{px(v):.1f}" y="{pad_t + h + 14}" text-anchor="middle">{_fmt(v)}</text>')
    for i, s in enumerate(series):
        runs: list[list[str]] = [[]]
        for xv, yv in zip(x, s.values, strict=True):
            if yv is None or yv <= 0:
                runs.append([])
            else:
                runs[-1].append(f"{px(xv):.1f},{py(yv):.1f}")
        for run in runs:
            if run:
                body.append(f'<polyline fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2" '
                            f'points="{" ".join(run)}"/>')
    body.append(f'<text x="{pad_l + w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_name)}</text>')
    return _svg(width, height, title, body)
