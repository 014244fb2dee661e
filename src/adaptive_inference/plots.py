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
