"""Figures for the report: headless (no pyplot state), and PNG bytes that depend only on the figure (no
matplotlib version in the metadata), so a report built twice from the same results is the same file."""

from __future__ import annotations

import io


def figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf, metadata={"Software": None})
    return buf.getvalue()


# offsets (points) tried for a label, nearest first: right, above, below, left, then farther out
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3.5) for dx, dy in
            ((7, 3), (7, -11), (-7, 3), (-7, -11), (0, 8), (0, -16), (12, -4), (-12, -4))]


def place_labels(fig, ax, items: list[tuple[str, tuple[float, float], str, tuple[float, float] | None]],
                 fontsize: float = 8) -> list:
    """Label the points of `ax` so that no label overlaps another label, a marker or an error bar:
    items are (text, (x, y), color, (x_lo, x_hi) of a horizontal error bar or None). Each label takes the
    nearest free offset (a leader line when it is not beside its point); the most crowded points are placed
    first. Call after everything else is drawn on the figure. Returns the annotations."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # final axes positions (constrained layout) and data limits
    renderer, to_px, scale = canvas.get_renderer(), ax.transData.transform, fig.dpi / 72
    frame = ax.get_window_extent(renderer)
    obstacles = []
    for _, (x, y), _, bar in items:
        px, py = to_px((x, y))
        obstacles.append(Bbox.from_extents(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale))
        if bar is not None:
            (lx, _), (hx, _) = to_px((bar[0], y)), to_px((bar[1], y))
            obstacles.append(Bbox.from_extents(lx - 1, py - 4 * scale, hx + 1, py + 4 * scale))

    def crowd(i):
        p = to_px(items[i][1])
        return sum(1.0 / (1.0 + ((to_px(o[1]) - p) ** 2).sum() ** 0.5) for o in items)

    placed, out = [], [None] * len(items)
    for i in sorted(range(len(items)), key=crowd, reverse=True):
        text, xy, color, _ = items[i]
        best = None
        for k, off in enumerate(_OFFSETS):
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=off, fontsize=fontsize, color=color,
                              ha="left" if off[0] > 0 else "right" if off[0] < 0 else "center", va="bottom",
                              annotation_clip=False)
            box = ann.get_window_extent(renderer).expanded(1.0, 1.0)
            hits = sum(box.overlaps(b) for b in obstacles + placed) + (0 if frame.contains(box.x0, box.y0)
                                                                     and frame.contains(box.x1, box.y1) else 1)
            if best is None or hits < best[0]:
                if best is not None:
                    best[1].remove()
                best = (hits, ann, box, k)
            else:
                ann.remove()
            if hits == 0:
                break
        hits, ann, box, k = best
        if k >= 8:  # away from its point: a thin leader line shows which point it names
            ann.remove()
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=_OFFSETS[k], fontsize=fontsize,
                              color=color, ha=ann.get_ha(), va="bottom", annotation_clip=False,
                              arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "shrinkA": 0, "shrinkB": 3})
        ann.set_in_layout(False)
        placed.append(box)
        out[i] = ann
    return out
