"""HAT's forgetting ratio in `python -m metacl.report`, on hand-made results.json files."""

from __future__ import annotations

import math

import pytest

from metacl.report import build_report, forgetting_ratio

from .test_report import _write


def _run(root, name, method, seed, final, dataset="pmnist", n_tasks=2):
    first = [final[0]] + [0.0] * (n_tasks - 1)
    return _write(root, name, dataset=dataset, method=method, seed=seed, n_tasks=n_tasks,
                  extra={"accuracy_matrix": [first, final]})


def test_forgetting_ratio_arithmetic():
    rho = forgetting_ratio([0.8, 0.8, 0.5], [0.1, 0.2, 0.5], [0.9, 0.8, 0.5])
    assert rho[:2] == pytest.approx([0.7 / 0.8 - 1, 0.0]) and math.isnan(rho[2])


def test_report_computes_rho_per_seed_from_random_and_joint_runs(tmp_path):
    root = tmp_path / "sweep"
    # seed 0: random [0.1, 0.2], joint [0.9, 0.8]; seed 1: random [0.2, 0.2], joint [0.8, 0.6]
    _run(root, "r0", "random", 0, [0.1, 0.2])
    _run(root, "j0", "joint", 0, [0.9, 0.8])
    _run(root, "r1", "random", 1, [0.2, 0.2])
    _run(root, "j1", "joint", 1, [0.8, 0.6])
    _run(root, "h0", "hat", 0, [0.8, 0.8])  # rho = [-0.125, 0]       -> -0.0625
    _run(root, "h1", "hat", 1, [0.8, 0.4])  # rho = [0, 0.2/0.4 - 1]  -> -0.25
    _run(root, "s0", "sgd", 0, [0.5, 0.8])  # rho = [-0.5, 0]          -> -0.25
    _run(root, "s2", "sgd", 2, [0.5, 0.8])  # no random/joint for seed 2: no rho
    _run(root, "o0", "hat", 0, [0.5, 0.5], dataset="mnist2")  # other dataset: no references
    report = build_report([root], tmp_path / "out", plots=False)
    cells = {(c.dataset, c.method): c for c in report.cells}
    hat = cells[("pmnist", "hat")]
    mean, ci, n = hat.stats["rho"]
    assert n == 2 and mean == pytest.approx((-0.0625 - 0.25) / 2)
    assert ci == pytest.approx(12.706 * abs(-0.0625 + 0.25) / math.sqrt(2) / math.sqrt(2),
                               abs=1e-3)  # scipy.stats.t: 12.7062...
    assert cells[("pmnist", "sgd")].stats["rho"] == pytest.approx((-0.25, None, 1))
    assert cells[("pmnist", "random")].stats["rho"][0] == pytest.approx(-1.0)
    assert cells[("pmnist", "joint")].stats["rho"][0] == pytest.approx(0.0)
    assert "rho" not in cells[("mnist2", "hat")].stats
    header = next(line for line in report.markdown.splitlines() if line.startswith("| dataset"))
    assert header.rstrip(" |").endswith("| rho")
    # per task: (-0.125 + 0) / 2 and (0 - 0.5) / 2
    assert "- pmnist/hat: -0.062 -0.250" in report.markdown
    assert "-0.156 ± " in report.markdown  # three decimals, not percent
