"""Tests for continual-learning metrics and matrix plots (values worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metacl.metrics import (
    METRIC_KEYS,
    compute_metrics,
    load_matrix_csv,
    partial_metrics,
    save_matrix_csv,
    save_matrix_heatmap,
)

# R[t][u]: accuracy on task u after training task t. Chosen so that
#   * the last diagonal entry equals the final one (BTI averages over 3, BWT over 2: BTI != BWT);
#   * task 0 peaks *after* it was learned (R[1][0] = 0.95 > R[0][0] = 0.90), so forgetting's
#     max is not the diagonal and forgetting != -BWT.
R3 = [
    [0.90, 0.10, 0.10],
    [0.95, 0.80, 0.20],
    [0.70, 0.60, 0.85],
]
B3 = [0.10, 0.05, 0.10]  # accuracy of the untrained model on each task


def test_keys_and_types():
    m = compute_metrics(R3, B3)
    assert tuple(m) == METRIC_KEYS == ("RA", "BTI", "ACC", "BWT", "FWT", "forgetting", "LA")
    assert all(type(v) is float for v in m.values())


def test_ra_and_acc():
    # mean of the last row: (0.70 + 0.60 + 0.85) / 3 = 2.15 / 3
    m = compute_metrics(R3, B3)
    assert m["RA"] == pytest.approx(2.15 / 3)
    assert m["ACC"] == m["RA"]


def test_bti_averages_over_all_tasks():
    # ((0.70 - 0.90) + (0.60 - 0.80) + (0.85 - 0.85)) / 3 = -0.40 / 3
    assert compute_metrics(R3, B3)["BTI"] == pytest.approx(-0.40 / 3)


def test_bwt_excludes_last_task():
    # ((0.70 - 0.90) + (0.60 - 0.80)) / 2 = -0.40 / 2 = -0.20
    assert compute_metrics(R3, B3)["BWT"] == pytest.approx(-0.20)


def test_fwt():
    # ((R[0][1] - b[1]) + (R[1][2] - b[2])) / 2 = ((0.10 - 0.05) + (0.20 - 0.10)) / 2 = 0.075
    assert compute_metrics(R3, B3)["FWT"] == pytest.approx(0.075)
    # b[0] and the first column play no role in FWT.
    assert compute_metrics(R3, [0.99, 0.05, 0.10])["FWT"] == pytest.approx(0.075)


def test_forgetting_uses_max_over_earlier_rows():
    # task 0: max(0.90, 0.95) - 0.70 = 0.25 (max is R[1][0], not the diagonal)
    # task 1: max(0.10, 0.80) - 0.60 = 0.20
    # mean: (0.25 + 0.20) / 2 = 0.225   (diagonal-based would give 0.20)
    assert compute_metrics(R3, B3)["forgetting"] == pytest.approx(0.225)


def test_la():
    # mean of the diagonal: (0.90 + 0.80 + 0.85) / 3 = 2.55 / 3 = 0.85
    assert compute_metrics(R3, B3)["LA"] == pytest.approx(0.85)


def test_single_task():
    # T == 1: RA = ACC = LA = R[0][0]; BTI = 0.8 - 0.8 = 0; empty averages are 0.0.
    m = compute_metrics([[0.8]], [0.1])
    assert m == {
        "RA": pytest.approx(0.8),
        "BTI": 0.0,
        "ACC": pytest.approx(0.8),
        "BWT": 0.0,
        "FWT": 0.0,
        "forgetting": 0.0,
        "LA": pytest.approx(0.8),
    }


def test_numpy_input_equals_list_input():
    assert compute_metrics(np.array(R3), np.array(B3)) == compute_metrics(R3, B3)


@pytest.mark.parametrize(("R", "b"), [([[0.5, 0.5]], [0.1, 0.1]), (R3, [0.1, 0.1]), ([], [])])
def test_bad_shapes_rejected(R, b):
    with pytest.raises(ValueError):
        compute_metrics(R, b)


def test_partial_metrics_uses_top_left_block():
    # Run of 3 tasks stopped after 2: rows 0-1 (evaluated on all 3 tasks) -> block
    #   [[0.90, 0.10],
    #    [0.95, 0.80]],  b[:2] = [0.10, 0.05]
    # RA = (0.95 + 0.80) / 2 = 0.875     LA = (0.90 + 0.80) / 2 = 0.85
    # BWT = 0.95 - 0.90 = 0.05           BTI = (0.05 + 0.00) / 2 = 0.025
    # FWT = 0.10 - 0.05 = 0.05           forgetting = max(0.90) - 0.95 = -0.05
    m = partial_metrics(R3[:2], B3)
    expected = {
        "RA": 0.875,
        "BTI": 0.025,
        "ACC": 0.875,
        "BWT": 0.05,
        "FWT": 0.05,
        "forgetting": -0.05,
        "LA": 0.85,
    }
    assert m == pytest.approx(expected)
    assert m == compute_metrics([r[:2] for r in R3[:2]], B3[:2])
    # Rows that only cover the tasks seen so far work too; the full matrix gives full metrics.
    assert partial_metrics([[0.90, 0.10], [0.95, 0.80]], B3) == m
    assert partial_metrics(R3, B3) == compute_metrics(R3, B3)
    with pytest.raises(ValueError):
        partial_metrics([], B3)


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path):
    path = save_matrix_csv(R3, tmp_path / "acc.csv")
    lines = (tmp_path / "acc.csv").read_text().splitlines()
    assert lines[0] == "after_task,task_0,task_1,task_2"
    assert lines[1].startswith("0,0.9,")
    R, labels = load_matrix_csv(path)
    assert R == R3 and labels == ["0", "1", "2"]


def test_csv_partial_matrix_with_labels_and_nan(tmp_path):
    R = [[0.5, float("nan"), 1 / 3]]
    save_matrix_csv(R, tmp_path / "p.csv", row_labels=["task_a"])
    loaded, labels = load_matrix_csv(tmp_path / "p.csv")
    assert labels == ["task_a"]
    assert loaded[0][0] == 0.5 and math.isnan(loaded[0][1]) and loaded[0][2] == 1 / 3
    with pytest.raises(ValueError):
        save_matrix_csv(R3, tmp_path / "q.csv", row_labels=["only one"])


def test_heatmap_png(tmp_path):
    path = tmp_path / "acc.png"
    fig = save_matrix_heatmap(R3, path, title="toy run")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000
    ax = fig.axes[0]
    assert ax.get_title() == "toy run"
    texts = [t.get_text() for t in ax.texts]
    assert "95.0" in texts and len(texts) == 9  # one percentage per cell
    assert ax.get_yticklabels()[0].get_text() == "after task 0"
    assert ax.get_xticklabels()[2].get_text() == "task 2"
    assert len(fig.axes) == 2  # heatmap + colour bar


def test_heatmap_partial_matrix_skips_nan(tmp_path):
    fig = save_matrix_heatmap([[0.9, float("nan")]], tmp_path / "p.png", title="partial")
    assert [t.get_text() for t in fig.axes[0].texts] == ["90.0"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
