"""Report figures: labels never cover another label, a marker or an error bar."""

import itertools

import numpy as np
import pytest

from adaptive_inference import plots

Text = pytest.importorskip("matplotlib.text").Text


def _render(points, bars=True):
    fig = plots.figure(5.2, 4.2)
    ax = fig.add_subplot()
    items = []
    for i, (name, x, y) in enumerate(points):
        bar = (x - 0.02, x + 0.02) if bars else None
        ax.errorbar([x], [y], xerr=[[0.02], [0.02]] if bars else None, fmt="o", color=f"C{i % 10}", capsize=3)
        items.append((name, (x, y), f"C{i % 10}", bar))
    ax.margins(0.2)
    anns = plots.place_labels(fig, ax, items)
    plots.png(fig)  # the final draw must keep the positions the labels were placed at
    renderer = fig.canvas.get_renderer()
    return ax, items, [Text.get_window_extent(a, renderer) for a in anns]  # the text, not its leader line


@pytest.mark.parametrize("bars", [True, False])
def test_labels_do_not_overlap_each_other_or_points(bars):
    # the report's crowded case: several configurations at nearly the same speedup and KL
    rng = np.random.default_rng(0)
    pts = [("lobotomy", 1.04, 0.20), ("router", 1.03, 0.0), ("stacked", 1.10, 0.21), ("baseline", 1.0, 0.0)]
    pts += [(f"token-{k}", 1.0 + 0.05 * rng.random(), 0.3 * rng.random()) for k in range(8)]
    ax, items, boxes = _render(pts, bars)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    to_px = ax.transData.transform
    for box, (_, xy, _, _) in itertools.product(boxes, items):
        px, py = to_px(xy)
        assert not box.overlaps(type(box).from_extents(px - 3, py - 3, px + 3, py + 3))
    assert len(boxes) == len(pts)


def test_a_label_with_room_sits_beside_its_point_without_a_leader():
    ax, items, boxes = _render([("alone", 1.0, 0.1), ("far", 1.5, 0.9)])
    for box, (_, xy, _, _) in zip(boxes, items, strict=True):
        px, py = ax.transData.transform(xy)
        assert abs(box.x0 - px) < 30 and abs(box.y0 - py) < 30
    assert all(a.arrow_patch is None for a in ax.texts)
