"""eval.py: a run's checkpoint evaluated again into its own file; the run is only read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from metacl.errors import ConfigError
from metacl.evaluate import evaluate_run
from metacl.runner.main import main as run_main

from .conftest import ROOT


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_reproduces_the_last_row_and_never_touches_the_run(compose, tmp_path):
    run = tmp_path / "run"
    run_main(compose(["debug=fast", "method=er", "dataset=mnist2_bundled",
                      f"paths.output_dir={run}"]))
    before = {p.name: _digest(p) for p in [run / "results.json",
                                           *(run / "checkpoints").iterdir()]}
    results = json.loads((run / "results.json").read_text())
    out = evaluate_run(run)
    assert out["accuracy"] == results["accuracy_matrix"][-1]  # same model, same data
    assert out["accuracy_agnostic"] == results["accuracy_matrix_agnostic"][-1]
    more = evaluate_run(run, overrides=["dataset.limit_test_per_task=100"])
    assert set(more["test_samples"]) == {100} and set(out["test_samples"]) == {50}
    assert {p.name: _digest(p) for p in [run / "results.json",
                                         *(run / "checkpoints").iterdir()]} == before
    written = sorted(p.name for p in run.glob("eval-*.json"))
    assert written == ["eval-dataset.limit_test_per_task=100.json", "eval-default.json"]


def test_eval_command_line_and_its_refusals(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_run(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2 and "python eval.py run=<run folder>" in proc.stderr
