"""Saving accuracy matrices as CSV tables and annotated heatmaps.

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas instead of pyplot,
so nothing depends on (or changes) the global backend, it works headless, and figures are not
kept alive by pyplot's figure manager.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["load_matrix_csv", "save_matrix_csv", "save_matrix_heatmap"]

PathLike = str | os.PathLike


def _as_matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"expected a 2-D accuracy matrix, got shape {R.shape}")
    return R


def save_matrix_csv(R, path: PathLike, row_labels: Sequence[object] | None = None) -> str:
    """Write ``R`` (rows = after task t, columns = task u) as CSV; returns the path.

    Header: ``after_task,task_0,...,task_{n-1}``. The first column holds ``row_labels``
    (default: the row index). Values are written with ``repr`` so they round-trip exactly;
    missing evaluations (NaN) are written as empty cells. Non-square matrices (a partial run)
    are allowed.
    """
    R = _as_matrix(R)
    labels = list(range(R.shape[0])) if row_labels is None else list(row_labels)
    if len(labels) != R.shape[0]:
        raise ValueError(f"{len(labels)} row labels for {R.shape[0]} rows")
    path = os.fspath(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["after_task", *(f"task_{u}" for u in range(R.shape[1]))])
        for label, row in zip(labels, R):
            writer.writerow([label, *("" if np.isnan(v) else repr(float(v)) for v in row)])
    return path


def load_matrix_csv(path: PathLike) -> tuple[list[list[float]], list[str]]:
    """Read a file written by :func:`save_matrix_csv`: ``(R, row_labels)``; empty -> NaN."""
    with open(os.fspath(path), newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["after_task"]:
        raise ValueError(f"{path} is not an accuracy-matrix CSV (missing 'after_task' header)")
    labels = [r[0] for r in rows[1:]]
    R = [[float(v) if v != "" else float("nan") for v in r[1:]] for r in rows[1:]]
    return R, labels


def save_matrix_heatmap(R, path: PathLike, title: str = "Accuracy matrix") -> Figure:
    """Save ``R`` as an annotated heatmap PNG and return the (already saved) Figure.

    Rows are labelled "after task t", columns "task u"; each cell shows the accuracy as a
    percentage; NaN cells (not evaluated) are left blank. The colour scale is fixed to
    0-100 % so heatmaps of different runs are visually comparable.
    """
    R = _as_matrix(R)
    pct = 100.0 * R
    n_rows, n_cols = pct.shape

    # Grow the canvas with the number of tasks so every cell keeps roughly the same size
    # (~0.55 x 0.45 in), which fits a "100.0" label at a fixed small font.
    width = max(4.5, 0.55 * n_cols + 2.5)
    height = max(3.5, 0.45 * n_rows + 1.8)
    fontsize = 9.0 if max(n_rows, n_cols) <= 10 else 7.0

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(pct), cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto"
    )
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("accuracy (%)")

    for t in range(n_rows):
        for u in range(n_cols):
            value = pct[t, u]
            if np.isnan(value):
                continue
            # Dark text on the bright (yellow) end of viridis, light text elsewhere.
            color = "black" if value > 60.0 else "white"
            ax.text(u, t, f"{value:.1f}", ha="center", va="center", color=color, fontsize=fontsize)

    ax.set_xticks(
        range(n_cols),
        [f"task {u}" for u in range(n_cols)],
        rotation=45,
        ha="right",
        fontsize=fontsize + 1,
    )
    ax.set_yticks(range(n_rows), [f"after task {t}" for t in range(n_rows)], fontsize=fontsize + 1)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    ax.set_title(title)

    fig.savefig(os.fspath(path), dpi=120)
    return fig
