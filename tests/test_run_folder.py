"""A run folder is never damaged by another command: refused commands touch no existing run and
leave no folder behind, one run at a time per folder, resume/report refuse missing folders, a
multirun reports its jobs and fails when one did (issue: sweeps and runs that never lose work)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metacl.errors import ConfigError
from metacl.runner.folder import FolderLock
from metacl.runner.main import main as run_main

from .conftest import ROOT


def _cli(args, cwd, module=None):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, "-m", module] if module else [sys.executable,
                                                             str(ROOT / "train.py")]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted((folder / ".hydra").iterdir())}


def test_refused_commands_touch_no_run_and_leave_no_folder(tmp_path):
    first = _cli(["debug=fast", "method=er", "seed=5"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = tmp_path / "outputs" / "debug" / "runs"
    (run,) = runs.iterdir()
    assert "seed=5" in (run / ".hydra" / "overrides.yaml").read_text()
    before, results = _digest(run), (run / "results.json").read_bytes()
    refused = _cli(["debug=fast", "method=er", "seed=5", "method.lr=0.5", f"resume={run}"],
                   tmp_path)
    assert refused.returncode == 2 and "method.lr" in refused.stderr.strip().splitlines()[-1]
    assert _digest(run) == before and (run / "results.json").read_bytes() == results
    bad = _cli(["debug=fast", "method=er", "method.lr=-1"], tmp_path)
    assert bad.returncode == 2 and "method.lr=-1" in bad.stderr
    assert list(runs.iterdir()) == [run]  # no empty folder from the rejected value


def test_a_second_run_into_a_locked_folder_is_refused(compose, tmp_path):
    lock = FolderLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            run_main(compose(["debug=fast", "method=er", f"paths.output_dir={tmp_path}"]))
        assert not (tmp_path / "results.json").exists()
    finally:
        lock.release()
    run_main(compose(["debug=fast", "method=er", f"paths.output_dir={tmp_path}"]))
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"


def test_a_cli_run_into_a_folder_in_use_stops_with_one_line(tmp_path):
    """Another process holds the folder (a run in progress): a second run into it exits 2
    with one line and writes nothing there."""
    out = tmp_path / "shared"
    script = ("import time; from metacl.runner.folder import FolderLock; "
              f"FolderLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = _cli(["debug=fast", "method=er", f"hydra.run.dir={out}"], tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    assert "in use by another run (pid" in second.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "train.log"]


def test_resume_and_report_of_a_missing_folder_create_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    resume = _cli(["debug=fast", f"resume={missing}"], tmp_path)
    assert resume.returncode == 2 and "resume.path=" in resume.stderr.strip().splitlines()[-1]
    report = _cli([str(missing)], tmp_path, module="metacl.report")
    assert report.returncode == 2 and "does not exist" in report.stderr
    assert not missing.exists()


def test_a_multirun_with_a_failed_job_prints_a_table_and_exits_1(tmp_path):
    failed = _cli(["-m", "debug=fast", "method=er", "method.lr=0.1,-1"], tmp_path)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "1 of 2 jobs completed" in failed.stderr
    assert "failed: ConfigError: method.lr=-1" in failed.stderr
    ok = _cli(["-m", "debug=fast", "method=er", "seed=0,1"], tmp_path)
    assert ok.returncode == 0 and "2 of 2 jobs completed" in ok.stderr
