"""Small inline SVG plots, written by hand (no JS, no external resources)."""

from __future__ import annotations

import math
import os
from html import escape
from typing import Sequence

_W, _H = 640, 320
_ML, _MR, _MT, _MB = 70, 20, 30, 60
_COLORS = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b")


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 0.01:
        return f"{v:.1e}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 1e-9:
        if v >= lo - step * 1e-9:
            ticks.append(round(v, 12))
        v += step
    return ticks


def _frame(title: str, xlabel: str, ylabel: str, height: int = _H) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" viewBox="0 0 {_W} {height}" '
        f'width="{_W}" height="{height}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{_W}" height="{height}" fill="#fff"/>',
        f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{(_ML + _W - _MR) / 2}" y="{_H - 8}" text-anchor="middle" font-size="12">{escape(xlabel)}</text>',
        f'<text x="14" y="{(_MT + _H - _MB) / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {(_MT + _H - _MB) / 2})">{escape(ylabel)}</text>',
        f'<line x1="{_ML}" y1="{_H - _MB}" x2="{_W - _MR}" y2="{_H - _MB}" stroke="#333"/>',
        f'<line x1="{_ML}" y1="{_MT}" x2="{_ML}" y2="{_H - _MB}" stroke="#333"/>',
    ]


#: approximate width of one character at font-size 11 (for placing labels; SVG cannot measure)
_CHAR_W = 6.2
_LINE_H = 12.0


def short_labels(labels: Sequence[str]) -> list[str]:
    """Labels without what they all share: a common leading name ("model-") and ".gguf"; a label
    left empty keeps its full form."""
    labels = list(labels)
    stem = [lb[:-5] if lb.endswith(".gguf") else lb for lb in labels]
    if len(stem) < 2:
        return stem
    cut = os.path.commonprefix(stem).rfind("-") + 1  # cut at a word boundary
    return [lb[cut:] or full for lb, full in zip(stem, labels)]


def place_labels(anchors: Sequence[tuple[float, float, str]], *, left: float, right: float, top: float,
                 bottom: float) -> list[tuple[float, float, str]]:
    """Where to write each point's label so that no two overlap and none leaves the plot:
    ``anchors`` (x, y, text) of the points; returns (x, y, text-anchor) per label, in order. A label
    goes right of its point (left of it where it would cross ``right``), moved down or up in steps
    of a line until its box is free."""
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float, str] | None] = [None] * len(anchors)
    for i in sorted(range(len(anchors)), key=lambda j: (anchors[j][1], anchors[j][0])):
        x, y, text = anchors[i]
        w = _CHAR_W * len(text)
        to_left = x + 9 + w > right and x - 9 - w >= left  # left of the point only where it fits there
        bx0 = x - 9 - w if to_left else x + 9
        spot = None
        for step in range(0, 24):
            for dy in ((step * _LINE_H,) if step == 0 else (step * _LINE_H, -step * _LINE_H)):
                ty = y + 4 + dy
                box = (bx0, ty - _LINE_H + 2, bx0 + w, ty + 2)
                if box[1] < top or box[3] > bottom:
                    continue
                if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in placed):
                    spot = (ty, box)
                    break
            if spot:
                break
        if spot is None:  # no free place: on the point's own line
            spot = (y + 4, (bx0, y - 8, bx0 + w, y + 6))
        placed.append(spot[1])
        out[i] = (x - 9 if to_left else x + 9, spot[0], "end" if to_left else "start")
    return out  # type: ignore[return-value]


def scatter_size_vs_kl(points: Sequence[tuple], *, title: str = "Size against KL divergence",
                       budget: float | None = None) -> str:
    """``points``: (label, size in MB, mean KL[, shape, chosen]); shape "circle" (made with the
    importance matrix, or any file) or "triangle" (without it); a chosen point is ringed and named
    "recommended". ``budget``: a dashed line at that mean KL. KL on a log axis (it spans decades)."""
    out = _frame(title, "file size (MB)", "mean KL divergence (nats, log scale)")
    pts = [(p[0], p[1], p[2], p[3] if len(p) > 3 else "circle", bool(p[4]) if len(p) > 4 else False)
           for p in points if p[2] is not None and p[1] is not None]
    if not pts:
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" font-size="12">no quantized files to plot</text>')
        return "\n".join(out + ["</svg>"])
    xs = [p[1] for p in pts]
    ks = [max(p[2], 1e-12) for p in pts] + ([budget] if budget else [])
    lo, hi = min(xs), max(xs)
    pad = (hi - lo) * 0.08 or hi * 0.05 or 1.0
    x0, x1 = max(0.0, lo - pad), hi + pad
    l0 = math.floor(math.log10(min(ks)))
    l1 = math.ceil(math.log10(max(ks)))
    if l1 == l0:
        l1 += 1
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def X(v: float) -> float:
        return _ML + (v - x0) / (x1 - x0) * pw

    def Y(k: float) -> float:
        return _H - _MB - (math.log10(k) - l0) / (l1 - l0) * ph

    for t in _nice_ticks(x0, x1):
        out.append(f'<line x1="{X(t):.1f}" y1="{_H - _MB}" x2="{X(t):.1f}" y2="{_H - _MB + 4}" stroke="#333"/>')
        out.append(f'<text x="{X(t):.1f}" y="{_H - _MB + 16}" text-anchor="middle" font-size="11">{_fmt(t)}</text>')
    for e in range(l0, l1 + 1):
        y = Y(10.0 ** e)
        out.append(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        out.append(f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">1e{e}</text>')
    if budget:
        y = Y(budget)
        out.append(f'<line class="budget" x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}" stroke="#c53030" '
                   f'stroke-dasharray="6 4"><title>budget: mean KL {_fmt(budget)}</title></line>')
        out.append(f'<text x="{_W - _MR - 4}" y="{y - 4:.1f}" text-anchor="end" font-size="11" fill="#c53030">'
                   f"budget {_fmt(budget)}</text>")
    shapes = {p[3] for p in pts}
    names = short_labels([p[0] for p in pts])
    texts = [f"{n}{' (recommended)' if p[4] else ''}" for n, p in zip(names, pts)]
    spots = place_labels([(X(p[1]), Y(max(p[2], 1e-12)), t) for p, t in zip(pts, texts)],
                         left=_ML, right=_W - 4, top=_MT, bottom=_H - _MB)
    for i, (lbl, s, k, shape, chosen) in enumerate(pts):
        c = _COLORS[i % len(_COLORS)]
        x, y = X(s), Y(max(k, 1e-12))
        tip = f"<title>{escape(lbl)}: {_fmt(s)} MB, KL {_fmt(k)}{' (recommended)' if chosen else ''}</title>"
        if shape == "triangle":
            out.append(f'<polygon class="point no-imatrix" points="{x:.1f},{y - 7:.1f} {x - 6:.1f},{y + 5:.1f} '
                       f'{x + 6:.1f},{y + 5:.1f}" fill="{c}">{tip}</polygon>')
        else:
            out.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{c}">{tip}</circle>')
        if chosen:
            out.append(f'<circle class="chosen" cx="{x:.1f}" cy="{y:.1f}" r="11" fill="none" stroke="#111" '
                       'stroke-width="2"/>')
        lx, ly, anchor = spots[i]
        weight = ' font-weight="bold"' if chosen else ""
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" font-size="11" fill="{c}"{weight}>'
                   f"{escape(texts[i])}</text>")
    if len(shapes) > 1:  # the legend: what the shapes mean
        lx, ly = _ML + 10, _MT + 10
        out.append(f'<circle cx="{lx}" cy="{ly}" r="5" fill="#555"/><text x="{lx + 10}" y="{ly + 4}" font-size="11">'
                   "with the importance matrix</text>")
        out.append(f'<polygon points="{lx},{ly + 11} {lx - 5},{ly + 21} {lx + 5},{ly + 21}" fill="#555"/>'
                   f'<text x="{lx + 10}" y="{ly + 21}" font-size="11">without</text>')
    return "\n".join(out + ["</svg>"])


def _bar_panel(out: list[str], x0: float, width: float, title: str, rows: Sequence[tuple[str, float]],
               color: str, vertical: bool = False) -> None:
    """One panel of bars; ``vertical``: labels written upwards (many bars), values in the tooltips only."""
    ph = _H - _MT - _MB - 20
    top_y = _MT + 20
    vmax = max(v for _, v in rows) * 1.15 or 1.0
    ticks = _nice_ticks(0, vmax)
    top = max(ticks[-1], vmax)

    def Y(v: float) -> float:
        return top_y + ph - v / top * ph

    out.append(f'<text x="{x0 + width / 2:.1f}" y="{_MT + 8}" text-anchor="middle" font-size="12">{escape(title)}</text>')
    out.append(f'<line x1="{x0:.1f}" y1="{top_y + ph:.1f}" x2="{x0 + width:.1f}" y2="{top_y + ph:.1f}" stroke="#333"/>')
    out.append(f'<line x1="{x0:.1f}" y1="{top_y:.1f}" x2="{x0:.1f}" y2="{top_y + ph:.1f}" stroke="#333"/>')
    for t in ticks:
        out.append(f'<line x1="{x0:.1f}" y1="{Y(t):.1f}" x2="{x0 + width:.1f}" y2="{Y(t):.1f}" stroke="#e2e8f0"/>')
        out.append(f'<text x="{x0 - 4:.1f}" y="{Y(t) + 4:.1f}" text-anchor="end" font-size="10">{_fmt(t)}</text>')
    group = width / len(rows)
    bw = min(36.0, group * 0.6)
    for i, (lbl, v) in enumerate(rows):
        gx = x0 + i * group + group / 2
        out.append(f'<rect class="bar" x="{gx - bw / 2:.1f}" y="{Y(v):.1f}" width="{bw:.1f}" '
                   f'height="{top_y + ph - Y(v):.1f}" fill="{color}"><title>{escape(lbl)} {escape(title)}: '
                   f"{_fmt(v)} tokens/s</title></rect>")
        if vertical:
            ly = top_y + ph + 6
            out.append(f'<text x="{gx + 3:.1f}" y="{ly:.1f}" text-anchor="end" font-size="10" '
                       f'transform="rotate(-90 {gx + 3:.1f} {ly:.1f})">{escape(lbl)}</text>')
        else:
            out.append(f'<text x="{gx:.1f}" y="{Y(v) - 3:.1f}" text-anchor="middle" font-size="10">{_fmt(v)}</text>')
            out.append(f'<text x="{gx:.1f}" y="{top_y + ph + 14:.1f}" text-anchor="middle" font-size="11">'
                       f"{escape(lbl)}</text>")


def bars_tokens_per_s(rows: Sequence[tuple[str, float, float]], *, threads: int | None = None,
                      title: str = "llama.cpp tokens per second") -> str:
    """``rows``: (label, prompt tokens/s, generation tokens/s). Two panels with their own scales
    (prompt processing is often 10-100x faster than generation)."""
    sub = f" ({threads} thread{'s' if threads != 1 else ''})" if threads else ""
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    gap = 50
    pw = (_W - _ML - _MR - gap) / 2
    labels = short_labels([r[0] for r in rows])
    # labels that do not fit under their bars are written upwards, in a taller plot
    vertical = bool(rows) and max(len(lb) for lb in labels) * _CHAR_W > pw / len(rows)
    extra = int(max(len(lb) for lb in labels) * _CHAR_W * 0.9) - _MB + 20 if vertical else 0
    out = _frame(title + sub, "", "tokens per second", height=_H + max(0, extra))
    out = [x for x in out if "<line" not in x]  # the panels draw their own axes
    if not rows:
        out.append(f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" font-size="12">no speed measured</text>')
        return "\n".join(out + ["</svg>"])
    _bar_panel(out, _ML, pw, "prompt processing", [(lb, r[1]) for lb, r in zip(labels, rows)], _COLORS[0], vertical)
    _bar_panel(out, _ML + pw + gap, pw, "generation", [(lb, r[2]) for lb, r in zip(labels, rows)], _COLORS[1],
               vertical)
    return "\n".join(out + ["</svg>"])
