"""A `python train.py -m hydra/launcher=slurm ...` multirun driven by a test: start it, watch
its job folders, requeue or signal its jobs, let requeued jobs start at once, and cancel
everything it submitted when the test ends (whatever happened)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from ..conftest import ROOT

# One core and no GPU per job: two jobs run at once on a 2-core node. Memory is not a
# consumable resource on the test cluster; 1 GB only has to fit the node.
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


class Sweep:
    """One multirun; `n` below is a job number (the `n_` prefix of its folder)."""

    def __init__(self, root: Path, overrides: list[str], *, timeout_min: int = 10,
                 launcher: tuple[str, ...] = (), requeued_time_limit: int | None = None):
        self.root = root
        self.dir = root / "sweep"
        self.name = f"metacl-test-{uuid.uuid4().hex[:10]}"  # scancel --name: only our jobs
        self.log_path = root / "launcher.log"
        self.args = ["-m", *LAUNCHER, f"hydra.launcher.name={self.name}",
                     f"hydra.launcher.timeout_min={timeout_min}", *launcher,
                     f"hydra.sweep.dir={self.dir}", *overrides]
        self.requeued_time_limit = requeued_time_limit  # minutes, for requeued jobs
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._releaser = threading.Thread(target=self._release_requeued, daemon=True)

    # ------------------------------------------------------------------ lifetime
    def start(self) -> Sweep:
        self.root.mkdir(parents=True, exist_ok=True)
        # The project root on the path: a job may name a test callback (tests.slurm.slow).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *self.args],
                                         cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)
        self._releaser.start()
        return self

    def finish(self, timeout: float) -> str:
        """Wait for the launcher (it returns when every job has a result; a thread releases
        requeued jobs meanwhile); its output. On time-out, fails with the jobs' state."""
        self.wait_until(lambda: self.proc.poll() is not None, timeout, "the multirun to end",
                        allow_exit=True)
        return self.log_path.read_text()

    def cancel(self) -> None:
        """Teardown: cancel our jobs (by their unique name) and stop the launcher."""
        self._stop.set()
        if self.proc is None or self.proc.poll() != 0:  # else every job has its result
            _run("scancel", f"--name={self.name}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    # ------------------------------------------------------------------ waiting
    def wait_until(self, condition, timeout: float, what: str, *, allow_exit=False) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if not allow_exit and self.proc.poll() is not None:
                raise AssertionError(f"the multirun ended before {what}\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}\n"
                                     f"{self.diagnostics()}")
            time.sleep(0.02)

    def _release_requeued(self) -> None:
        """SLURM holds a requeued batch job for 120 s (reason BeginTime) before it may start
        again; as an administrator would, this thread lets it start sooner (with
        `requeued_time_limit` minutes, if set): 3 s after it was first seen waiting. Released
        within the second of its requeue, the job was killed at once ("Job credential
        revoked": slurmd still held the revoked credential of the run it just ended)."""
        first_seen: dict[str, float] = {}
        while not self._stop.wait(1.0):
            pending = _run("squeue", "-h", f"--name={self.name}", "-t", "PD", "-o", "%i %r")
            for line in pending.stdout.splitlines():
                job_id, _, reason = line.partition(" ")
                if reason.strip() != "BeginTime":
                    continue
                seen = first_seen.setdefault(job_id, time.monotonic())
                if time.monotonic() - seen < 3.0:
                    continue
                first_seen.pop(job_id)
                if self.requeued_time_limit is not None:
                    _run("scontrol", "update", f"jobid={job_id}",
                         f"timelimit={self.requeued_time_limit}")
                _run("scontrol", "update", f"jobid={job_id}", "starttime=now")

    # ------------------------------------------------------------------ jobs
    def job_id(self, n: int) -> str | None:
        """The SLURM id of job n, once submitted: `<array id>_<n>`, or `<id>` when the sweep
        has one job (submitit submits no array then)."""
        for folder in (self.dir / ".submitit").glob("*"):
            if re.fullmatch(rf"\d+_{n}", folder.name) or (
                    n == 0 and folder.name.isdigit()
                    and (folder / f"{folder.name}_submitted.pkl").exists()):
                return folder.name
        return None

    def job_dir(self, n: int) -> Path | None:
        found = [p for p in self.dir.glob(f"{n}_*") if p.is_dir()]
        return found[0] if found else None

    def results(self, n: int) -> dict | None:
        folder = self.job_dir(n)
        try:
            return json.loads((folder / "results.json").read_text())
        except (TypeError, OSError, ValueError):
            return None

    def in_task(self, n: int, task: int) -> bool:
        """Job n is inside task `task` (>= 1): its rows say task-1 is done and its in-task
        checkpoint was written after them (the previous task's one is deleted after its row)."""
        folder, results = self.job_dir(n), self.results(n)
        if results is None or len(results.get("accuracy_matrix", [])) != task:
            return False
        step = folder / "checkpoints" / "step.ckpt"
        try:
            return step.stat().st_mtime_ns > (folder / "results.json").stat().st_mtime_ns
        except OSError:
            return False

    def interrupt_in_task(self, task: int, actions: dict, timeout: float) -> None:
        """actions[n](n) as soon as job n is inside `task`; the jobs are watched together."""
        pending = dict(actions)

        def fire() -> bool:
            for n in [n for n in pending if self.in_task(n, task)]:
                pending.pop(n)(n)
            return not pending

        self.wait_until(fire, timeout, f"jobs {sorted(pending)} inside task {task}")

    def log(self, n: int) -> str:
        """submitit's stdout and stderr of job n, every run of it (they are appended)."""
        job_id = self.job_id(n)
        if job_id is None:
            return ""
        files = sorted((self.dir / ".submitit" / job_id).glob("*_log.*"))
        return "\n".join(f.read_text(errors="replace") for f in files)

    def events(self, n: int, message: str) -> int:
        """How many times submitit logged `message` for job n (each event is written to both
        log files, in two formats; its timestamp tells them apart)."""
        pattern = rf"submitit \w+ \(([^)]+)\) - {re.escape(message)}"
        return len(set(re.findall(pattern, self.log(n))))

    def requeue(self, n: int) -> None:
        done = _run("scontrol", "requeue", self.job_id(n))
        assert done.returncode == 0, done.stderr

    def signal(self, n: int, name: str) -> None:
        """What SLURM does on pre-emption: the signal to the job's step (the python process)."""
        done = _run("scancel", f"--signal={name}", self.job_id(n))
        # The job may requeue itself (submitit, on SIGUSR2) before scancel is done with it:
        # scancel then says "Job is pending execution"; the signal was delivered.
        assert done.returncode == 0 or "pending" in done.stderr, done.stderr

    def diagnostics(self) -> str:
        queue = _run("squeue", "-a", f"--name={self.name}", "-o", "%i %T %r %M").stdout
        jobs = sorted({int(m.group(1)) for p in (self.dir / ".submitit").glob("*_*")
                       if (m := re.fullmatch(r"\d+_(\d+)", p.name))} or {0})
        logs = "\n".join(f"--- job {n}\n{self.log(n)[-3000:]}" for n in jobs)
        launcher = self.log_path.read_text()[-3000:] if self.log_path.exists() else ""
        return f"squeue:\n{queue}\n--- launcher\n{launcher}\n{logs}"
