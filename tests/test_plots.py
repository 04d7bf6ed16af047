"""The report's plot helpers: pure functions, tested on their own."""

from __future__ import annotations

import itertools

from lora2gguf.report.plots import _CHAR_W, _LINE_H, place_labels, scatter_size_vs_kl, short_labels


def test_short_labels_drop_what_every_label_shares():
    names = ["xyrus-demo-Q8_0.gguf", "xyrus-demo-Q4_K_M.gguf", "xyrus-demo-Q4_K_M-no-imatrix.gguf"]
    assert short_labels(names) == ["Q8_0", "Q4_K_M", "Q4_K_M-no-imatrix"]
    # the shared part is cut at a word boundary, not inside a type name
    assert short_labels(["m-Q4_K_M.gguf", "m-Q4_K_S.gguf"]) == ["Q4_K_M", "Q4_K_S"]
    assert short_labels(["only-one.gguf"]) == ["only-one"]
    assert short_labels(["a.gguf", "b.gguf"]) == ["a", "b"]
    assert short_labels([]) == []


def _boxes(anchors, spots):
    out = []
    for (x, y, text), (lx, ly, anchor) in zip(anchors, spots):
        w = _CHAR_W * len(text)
        x0 = lx - w if anchor == "end" else lx
        out.append((x0, ly - _LINE_H + 2, x0 + w, ly + 2))
    return out


def test_labels_of_points_on_top_of_each_other_do_not_overlap_and_stay_inside():
    anchors = [(300.0, 150.0, f"IQ{i}_XS (no imatrix)") for i in range(8)] + [(600.0, 150.0, "Q8_0 (recommended)")]
    spots = place_labels(anchors, left=70, right=636, top=30, bottom=260)
    boxes = _boxes(anchors, spots)
    for a, b in itertools.combinations(boxes, 2):
        assert a[2] <= b[0] or a[0] >= b[2] or a[3] <= b[1] or a[1] >= b[3], (a, b)
    for x0, y0, x1, y1 in boxes:
        assert 70 <= x0 and x1 <= 636 and 30 <= y0 and y1 <= 260
    assert spots[-1][2] == "end"  # near the right edge: written to the left of its point
    assert spots[0][2] == "start"


def test_the_size_axis_spans_the_files_not_zero():
    svg = scatter_size_vs_kl([("m-Q4_K_M.gguf", 33.9, 0.15), ("m-Q8_0.gguf", 40.5, 0.02)])
    ticks = [t for t in svg.split("\n") if 'text-anchor="middle" font-size="11"' in t]
    values = [float(t.rsplit(">", 2)[-2].split("<")[0]) for t in ticks]
    assert values and min(values) >= 30 and max(values) <= 45
    assert ">Q4_K_M<" in svg and ">Q8_0<" in svg  # short labels
