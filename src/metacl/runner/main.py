"""`main(cfg)`: validate -> resume plan -> Session -> the protocol's loop.

In a multirun (`-m`, Optuna, submitit, joblib) a failing job never stops the sweep: `main`
records it as failed in its results.json and returns NaN, which the Optuna sweeper records as
a failed trial.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

# Lightning 2.6 on torch 2.14 warns about its own use of a deprecated torch API at every fit.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# On a machine with SLURM installed Lightning suggests `srun` for every fit; our SLURM path is
# the submitit launcher (one job, one device), so the hint is noise.
warnings.filterwarnings("ignore", message=r".*The `srun` command is available.*")

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from metacl.checkpoint import plan_resume
from metacl.cli import user_error as find_user_error
from metacl.runner import continual, episodic
from metacl.runner.folder import FolderLock, RunFolder, write_hydra_record
from metacl.runner.health import DivergedError
from metacl.runner.job import JobInfo, job_info, resolved_config
from metacl.runner.record import FILE, RunRecord, atomic_write_text
from metacl.runner.session import Session, console
from metacl.validate import check_writable, validate_config

log = logging.getLogger(__name__)

# The loop of each datamodule protocol (a class attribute of the datamodule, never the
# method's name), and how it reads the optimized metric back from a finished run.
LOOPS = {"continual": (continual.ContinualLoop, continual.finished_metric),
         "episodic": (episodic.EpisodicLoop, episodic.finished_metric)}


def main(cfg: DictConfig) -> float:
    """Run one job. In a multirun a failing job is recorded as failed and returns NaN, so the
    other jobs (and the sweeper) go on; a single run raises as usual."""
    job = job_info(cfg)
    try:
        return run_job(cfg)
    except Exception as err:
        if not job.multirun:
            raise
        return record_failed_job(cfg, job, err)


def run_job(cfg: DictConfig) -> float:
    """Checks, then the loop. A command refused before its run started leaves nothing behind:
    no folder it created, no change to an existing run (metacl.runner.folder)."""
    started = time.perf_counter()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out_dir = Path(cfg.paths.output_dir)
    folder = RunFolder(out_dir)
    try:
        run = prepare(cfg, out_dir, started, folder.lock)
    except BaseException:
        folder.abandon()
        raise
    try:
        return run()
    finally:
        folder.lock.release()


def prepare(cfg: DictConfig, out_dir: Path, started: float, lock: FolderLock):
    """Validate, plan the resume, take the folder, build the data and the loop; returns what
    runs the job (for a finished run: what returns the metric it already has)."""
    loop = prepare_loop(cfg, out_dir, started, lock)
    return loop.run if hasattr(loop, "run") else (lambda: loop)


def prepare_loop(cfg: DictConfig, out_dir: Path, started: float, lock: FolderLock):
    """Everything before the training: the job's loop, ready to run (or, for a run that is
    already finished, the metric it has). A population (metacl.population) prepares each
    member's loop this way and trains them together."""
    # Everything that can be checked from the config alone is checked before any data is
    # loaded and before anything is written (metacl.validate).
    protocol = validate_config(cfg)
    loop_class, finished_metric = LOOPS[protocol]
    session = Session(cfg, out_dir, started)  # the device, from Lightning's strategy
    plan = plan_resume(cfg, out_dir, session.config)
    if plan is not None and plan.finished:
        console.print(f"{plan.out_dir} already completed; nothing to resume. "
                      f"results: {plan.out_dir / FILE}")
        return finished_metric(cfg, plan.boundary["results"])
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, verbose=False)
    dm = instantiate(cfg.dataset).build().to(session.device)
    # The folder is taken once the data loaded (a missing dataset leaves nothing behind) and
    # before the loop writes anything.
    lock.acquire()
    write_hydra_record(out_dir, cfg)
    return loop_class(session, dm, resume=plan)


def record_failed_job(cfg: DictConfig, job: JobInfo, err: Exception) -> float:
    """A multirun job that failed: its results.json says so (never rewriting another run's
    results for a bad config), one line on stderr, NaN for the sweeper."""
    out_dir = Path(str(cfg.paths.output_dir))
    path = out_dir / FILE
    user_error = find_user_error(err)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = None
    record = RunRecord(out_dir, results)
    if results is None:
        record = RunRecord.new(out_dir, resolved_config(cfg, job), stream=True)
        record.mark_stopped(err)
    elif results.get("status") == "running":
        record.mark_stopped(err)
    # A bad config never rewrites an existing run's results (e.g. a refused resume).
    if user_error is None or not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record.data, indent=2))
    if user_error is not None:
        print(f"error: {user_error}", file=sys.stderr)
    elif not isinstance(err, DivergedError):  # a bug: keep its traceback in the job's log
        log.error("job %s failed", job.name, exc_info=err)
    print(f"job {job.hydra.get('job_num', '')} ({job.name}) {record.data['status']}\n"
          f"recorded in {path}; the other jobs go on", file=sys.stderr)
    return float("nan")
