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


# A train.py run that stops at a known point until the test lets it go: `second` right before
# it takes the folder's lock (it has looked at the folder when it started), `first` right after
# its first checkpoint (the lock, .hydra/, results.json and checkpoints/last.ckpt are there).
PAUSED_RUN = """
import os, runpy, sys, time
from pathlib import Path

sync, who = Path(os.environ["RACE_SYNC"]), os.environ["RACE_WHO"]

def pause():
    (sync / f"{who}.paused").touch()
    deadline = time.monotonic() + 300
    while not (sync / f"{who}.go").exists():
        if time.monotonic() > deadline:
            sys.exit(f"{who}: never let go")
        time.sleep(0.05)

if who == "second":
    from metacl.runner.folder import FolderLock
    take = FolderLock.acquire
    def acquire(self):
        pause()
        take(self)
    FolderLock.acquire = acquire
else:
    from metacl.runner.continual import ContinualLoop
    save = ContinualLoop.save_boundary
    def save_boundary(self, tasks_done):
        save(self, tasks_done)
        if not getattr(ContinualLoop, "paused_once", False):
            ContinualLoop.paused_once = True
            pause()
    ContinualLoop.save_boundary = save_boundary

sys.argv = sys.argv[1:]  # train.py and its arguments
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _paused_run(who, args, cwd, sync):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           "RACE_SYNC": str(sync), "RACE_WHO": who, "METACL_ROOT_DIR": str(cwd)}
    return subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(ROOT / "train.py"), *args],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(path: Path, proc) -> None:
    import time

    deadline = time.monotonic() + 300
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.05)


def test_a_refused_second_run_leaves_the_first_runs_folder_alone(tmp_path):
    """issue 17, two runs into one folder: the second command starts while the folder holds
    only Hydra's job log (so it looks like its own), the first then takes the folder and
    writes its checkpoint; the second is refused with one line (exit 2) and removes nothing:
    the first run's lock, .hydra/, results.json and checkpoint stay, and it completes."""
    sync, out = tmp_path / "sync", tmp_path / "same"
    sync.mkdir()
    common = ["debug=fast", "method=er", "logger=none", "trainer=cpu", "hydra.run.dir=same"]
    second = _paused_run("second", [*common, "seed=2"], tmp_path, sync)
    first = None
    try:
        _wait_for(sync / "second.paused", second)
        assert sorted(p.name for p in out.iterdir()) == ["train.log"]  # looks like its own
        first = _paused_run("first", [*common, "seed=1"], tmp_path, sync)
        _wait_for(sync / "first.paused", first)
        taken = sorted(p.name for p in out.iterdir())
        assert {".lock", ".hydra", "results.json", "checkpoints"} <= set(taken), taken
        ckpt = (out / "checkpoints" / "last.ckpt").read_bytes()

        (sync / "second.go").touch()
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
        assert f"paths.output_dir={out} is in use by another run (pid {first.pid})" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == taken  # nothing removed, nothing new
        assert (out / "checkpoints" / "last.ckpt").read_bytes() == ckpt
        probe = FolderLock(out)
        holder = probe.try_acquire()
        probe.release()
        assert holder == str(first.pid)  # the lock is still the first run's

        (sync / "first.go").touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        for proc in (second, first):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["config"]["seed"] == 1
    assert "seed=1" in (out / ".hydra" / "overrides.yaml").read_text()
    assert not (out / "results.json.tmp").exists()


def test_a_refused_population_job_leaves_the_folder_another_run_took(tmp_path):
    """The same race in a population multirun (metacl.population.launch, prepare_member): job 0
    has looked at its folder (only Hydra's job log) when another run takes it; job 0 is
    refused, removes nothing of that run, and job 1 still completes."""
    sync, sweep = tmp_path / "sync", tmp_path / "pop"
    sync.mkdir()
    pop = _paused_run("second", ["-m", "seed=0,1", "method=er", "debug=fast", "logger=none",
                                 "trainer=cpu", "hydra/launcher=population",
                                 "hydra.sweep.dir=pop"], tmp_path, sync)
    lock = None
    try:
        _wait_for(sync / "second.paused", pop)
        (job0,) = [p for p in sweep.iterdir() if p.is_dir()]
        assert sorted(p.name for p in job0.iterdir()) == ["train.log"]
        lock = FolderLock(job0)  # another run takes the folder and writes into it
        lock.acquire()
        (job0 / "checkpoints").mkdir()
        (job0 / "checkpoints" / "last.ckpt").write_bytes(b"the other run's checkpoint")
        (job0 / "results.json").write_text(json.dumps({"status": "running"}))
        taken = sorted(p.name for p in job0.iterdir())
        (sync / "second.go").touch()
        _, err = pop.communicate(timeout=600)
        assert f"error: paths.output_dir={job0} is in use by another run (pid {os.getpid()})" \
            in err, err[-3000:]
        assert sorted(p.name for p in job0.iterdir()) == taken
        assert (job0 / "checkpoints" / "last.ckpt").read_bytes() == b"the other run's checkpoint"
        assert json.loads((job0 / "results.json").read_text()) == {"status": "running"}
        probe = FolderLock(job0)
        assert probe.try_acquire() == str(os.getpid())  # still held by the other run
    finally:
        if lock is not None:
            lock.release()
        if pop.poll() is None:
            pop.kill()
            pop.wait()
    (job1,) = [p for p in sweep.iterdir() if p.is_dir() and p != job0]
    assert json.loads((job1 / "results.json").read_text())["status"] == "completed"
    assert pop.returncode == 1  # job 0 did not complete: the summary table says so


def test_abandon_removes_only_a_folder_nobody_else_has_used(tmp_path):
    """RunFolder.abandon, the clean-up of a refused command that runner.main and the
    population launcher share, in each case it meets."""
    from metacl.runner.folder import RunFolder

    def made_by_hydra(name):
        out = tmp_path / name
        out.mkdir()
        (out / "train.log").write_text("[INFO] - starting\n")
        return out

    alone = made_by_hydra("alone")  # nobody else: the folder goes
    RunFolder(alone).abandon()
    assert not alone.exists()

    held = made_by_hydra("held")  # another run took it after this command looked
    folder, other = RunFolder(held), FolderLock(held)
    other.acquire()
    (held / "results.json").write_text("{}")
    try:
        folder.abandon()
        assert sorted(p.name for p in held.iterdir()) == [".lock", "results.json", "train.log"]
    finally:
        other.release()

    filled = made_by_hydra("filled")  # another run wrote into it and is gone again
    folder = RunFolder(filled)
    (filled / "results.json").write_text("{}")
    folder.abandon()
    assert (filled / "results.json").exists()

    existing = tmp_path / "existing"  # a folder that was there before: never fresh
    existing.mkdir()
    RunFolder(existing).abandon()
    assert existing.is_dir()

    taken = made_by_hydra("taken")  # this command's own lock, refused after taking it
    folder = RunFolder(taken)
    folder.lock.acquire()
    folder.abandon()
    assert not taken.exists() and folder.lock.fd is None
