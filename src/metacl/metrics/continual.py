"""Continual-learning summary metrics computed from an accuracy matrix.

Conventions: ``R[t][u]`` is the accuracy (a fraction in [0, 1]) on task ``u`` measured right
after training on task ``t``; ``b[u]`` is the accuracy on task ``u`` of the model before any
training (random init). Formulas, sources and a worked example are in ``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["METRIC_KEYS", "compute_metrics", "partial_metrics"]

METRIC_KEYS: tuple[str, ...] = ("RA", "BTI", "ACC", "BWT", "FWT", "forgetting", "LA")

MatrixLike = Sequence[Sequence[float]] | np.ndarray


def compute_metrics(R: MatrixLike, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """All summary metrics of a finished run with T tasks.

    Args:
        R: T x T accuracy matrix, ``R[t][u]`` = accuracy on task u after training task t.
        b: length-T accuracies before any training (only FWT uses it).

    Returns:
        dict with keys ``RA, BTI, ACC, BWT, FWT, forgetting, LA`` and plain float values.
        Metrics averaging over an empty set (BWT, FWT, forgetting when T == 1) are 0.0.
    """
    R = np.asarray(R, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T x T matrix, got shape {R.shape}")
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"b must have length T={T}, got shape {b.shape}")

    final = R[T - 1]  # accuracies after the last task
    diag = np.diag(R)  # accuracy on each task just after learning it
    ra = float(final.mean())

    if T > 1:
        # Earlier tasks only: the last task cannot be forgotten yet.
        bwt = float((final[:-1] - diag[:-1]).mean())
        # Zero-shot accuracy on task u (after tasks < u) relative to the untrained model.
        fwt = float(np.mean([R[u - 1, u] - b[u] for u in range(1, T)]))
        # Best accuracy reached on task u at any point before the end, minus the final one.
        forgetting = float((R[:-1, :-1].max(axis=0) - final[:-1]).mean())
    else:
        bwt = fwt = forgetting = 0.0

    return {
        "RA": ra,
        # La-MAML/GEM code: bwt vector over *all* tasks (last entry is 0) averaged over T.
        "BTI": float((final - diag).mean()),
        "ACC": ra,
        "BWT": bwt,
        "FWT": fwt,
        "forgetting": forgetting,
        "LA": float(diag.mean()),
    }


def partial_metrics(R_rows: MatrixLike, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Metrics for a run stopped after k tasks (e.g. a crash or time limit).

    ``R_rows`` holds the k rows measured so far; each row may have length T (all tasks were
    evaluated) or at least k. Only the k x k top-left block -- the tasks already trained on --
    is used, together with ``b[:k]``, so the result equals ``compute_metrics`` of a k-task run.
    Unseen tasks are ignored rather than counted, so these numbers are not comparable with
    full-run numbers except as "metrics over the tasks seen so far".
    """
    rows = [np.asarray(r, dtype=np.float64).ravel() for r in R_rows]
    k = len(rows)
    if k == 0:
        raise ValueError("partial_metrics needs at least one completed task")
    if any(len(r) < k for r in rows):
        raise ValueError(f"each of the {k} rows needs at least {k} entries")
    b = np.asarray(b, dtype=np.float64).ravel()
    if len(b) < k:
        raise ValueError(f"b needs at least {k} entries, got {len(b)}")
    block = np.stack([r[:k] for r in rows])
    return compute_metrics(block, b[:k])
