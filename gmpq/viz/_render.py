"""Shared figure plumbing: an Agg-backed matplotlib figure outside pyplot, saved atomically.

Figures are built as ``matplotlib.figure.Figure`` objects with an explicit Agg canvas, so plotting never touches
pyplot's global state or the user's interactive backend, and works on headless machines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq.errors import RunError
from gmpq.utils import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 150
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
W_COLOR = "#3465a4"   # weights
A_COLOR = "#e07b00"   # activations
KEPT_W_COLOR = "#7f7f7f"
KEPT_A_COLOR = "#bdbdbd"


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure of ``width`` x ``height`` inches on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_format(path: str | os.PathLike) -> str:
    """The image format named by the suffix of ``path`` (.png, .svg or .pdf)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise RunError(f"figure path {str(path)!r} must end in one of {', '.join(FORMATS)} (the image format)")
    return FORMATS[suffix]


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary file + rename) in the format its suffix names."""
    fmt = figure_format(path)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, facecolor="white"))
