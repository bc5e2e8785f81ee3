"""Accuracy-matrix heatmap of a continual run: rows = after training task r, columns = dataset c (training order);
cells above the diagonal are Transfer entries (not yet learned), missing rows (an unfinished run) stay blank."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_accuracy_matrix(
    values,
    names: Sequence[str],
    png: str | Path,
    title: str = "",
    metrics: dict[str, float] | None = None,
    vmin: float = 0.0,
    vmax: float = 100.0,
) -> Path:
    """Render ``values`` (``[T, T]`` accuracies in %, NaN for missing entries) as an annotated heatmap.

    ``metrics`` (e.g. Transfer/Average/Last/BWT) are printed under the title; a title too long for the figure is
    wrapped onto several lines (never cut off). Returns the PNG path.

    Example::

        plot_accuracy_matrix(matrix.values, matrix.names, "matrix.png", "ConDU (FT), Order I", matrix.metrics())
    """
    import matplotlib.pyplot as plt

    fig = accuracy_matrix_figure(values, names, title, metrics, vmin, vmax)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _wrap_title(head: str, width_inches: float, fontsize: float) -> str:
    """``head`` with every line wrapped to the figure's width (an average glyph is ~0.6 em wide)."""
    import textwrap

    chars = max(12, int(width_inches * 72 / (0.6 * fontsize)) - 2)
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) if line else line for line in head.split("\n"))


def accuracy_matrix_figure(
    values,
    names: Sequence[str],
    title: str = "",
    metrics: dict[str, float] | None = None,
    vmin: float = 0.0,
    vmax: float = 100.0,
):
    """The ``matplotlib`` figure that :func:`plot_accuracy_matrix` saves (e.g. to show it in a notebook)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    A = np.asarray(values, dtype=np.float64)
    T = len(names)
    if A.shape != (T, T):
        raise ValueError(f"a {T}-task matrix must be {T}×{T}, got {A.shape}")
    size = max(3.5, 0.62 * T + 2.2)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    masked = np.ma.masked_invalid(A)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#f0f0f0")
    im = ax.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax)
    for r in range(T):
        for c in range(T):
            if np.isfinite(A[r, c]):
                shade = (A[r, c] - vmin) / max(vmax - vmin, 1e-9)
                ax.text(
                    c,
                    r,
                    f"{A[r, c]:.1f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if shade > 0.6 else "white",
                )
    # Transfer entries (r < c): outline the upper triangle
    for r in range(T):
        for c in range(r + 1, T):
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=0.4, ls=":", ec="#888888"))
    ax.set_xticks(range(T), list(names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(T), list(names), fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    head = title
    if metrics:
        label = {"bwt": "BWT"}
        parts = [
            f"{label.get(k, k.capitalize())}\u00a0{v:.1f}"  # no-break space: a metric stays on one line
            for k, v in metrics.items()
            if v is not None and np.isfinite(v)
        ]
        head = f"{title}\n{' / '.join(parts)}" if title else " / ".join(parts)
    if head:
        ax.set_title(_wrap_title(head, 0.75 * fig.get_figwidth(), 9), fontsize=9)  # centred on the axes
    fig.tight_layout()
    return fig
