"""Experiment loggers: one per run (one per job of a sweep), shared by the fresh Trainer of every task.

The loop drives them through five calls:

    start(config, output_dir, name, group, tags, job_type, run_id)  # once, config resolved
    log_metrics(metrics, step)                 # training loss every few batches, and what a
                                               # method logs with self.log (LightningBridge)
    log_task(task, row, metrics, step)         # after each task: accuracy row, metrics so far
    log_matrix(matrix, png_path, step, name)   # at the end: the whole matrix (and its heatmap)
    finish(summary, status, files, exit_code, model)   # final metrics, results.json, checkpoint

The loop logs with an explicit cumulative step (and a `task` value), because manual-optimization
methods do not advance Lightning's global_step in a meaningful way. `run_id` names the logger's
run (W&B): a resumed run passes the id stored in its checkpoint and goes on in the same run.
"""

from __future__ import annotations

import netrc
import os
import secrets
import shutil
import string
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from pytorch_lightning.loggers.logger import Logger as LightningLogger
from pytorch_lightning.utilities import rank_zero_only

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout train.py lives in


class NullRunLogger:
    run_id: str | None = None  # kept in results.json/the checkpoint so a resume goes on in it

    def start(self, config: dict, output_dir: str, name: str, group: str | None,
              tags: list[str] | None = None, job_type: str | None = None,
              run_id: str | None = None) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def log_task(self, task: int, row: list[float], metrics: dict, step: int) -> None:
        """After task `task`: its accuracy row R[task][:] and the metrics so far (prefixed keys,
        e.g. test/RA, val/RA)."""

    def log_matrix(self, matrix, png_path: str | None, step: int,
                   name: str = "accuracy_matrix") -> None:
        pass

    def finish(self, summary: dict, status: str, files: tuple | list = (),
               exit_code: int | None = None, model: str | None = None) -> None:
        pass


def _row_metrics(task: int, row: list[float], metrics: dict) -> dict:
    out = {f"acc/task_{u}": a for u, a in enumerate(row)}
    out["acc/mean_seen"] = sum(row[: task + 1]) / (task + 1)
    out.update(metrics)
    out["task"] = task
    return out


class CsvRunLogger(NullRunLogger):
    """Lightning's CSVLogger: <output_dir>/csv/metrics.csv and hparams.yaml."""

    def start(self, config, output_dir, name, group, tags=None, job_type=None, run_id=None):
        from pytorch_lightning.loggers import CSVLogger

        self.logger = CSVLogger(save_dir=output_dir, name="csv", version="")
        self.logger.log_hyperparams(config)

    def log_metrics(self, metrics, step):
        self.logger.log_metrics(metrics, step=step)

    def log_task(self, task, row, metrics, step):
        self.logger.log_metrics(_row_metrics(task, row, metrics), step=step)

    def finish(self, summary, status, files=(), exit_code=None, model=None):
        self.logger.log_metrics({f"final/{k}": v for k, v in summary.items()
                                 if isinstance(v, (int, float))})
        self.logger.finalize(status)


class LightningBridge(LightningLogger):
    """What a method logs with `self.log(...)` reaches the run's logger, at the run's
    cumulative step (`step()`), not the fresh per-task Trainer's own counter. Also what makes
    Lightning callbacks that need a logger (LearningRateMonitor) work."""

    def __init__(self, run_logger: NullRunLogger, step):
        super().__init__()
        self.run_logger, self.step = run_logger, step

    @property
    def name(self) -> str:
        return "metacl"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the run logger has the whole config already

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.run_logger.log_metrics(dict(metrics), self.step())


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """The checkout's commit and whether tracked files differ from it (None outside git)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def new_run_id() -> str:
    """A W&B-style run id (8 of [a-z0-9]) that touches no seeded random generator."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_command() -> str:
    """`wandb` as it can be typed here: bare when the PATH finds this interpreter's, else its
    path (`.venv/bin/wandb` when the venv is not active)."""
    exe = Path(sys.executable).parent / "wandb"
    if not exe.exists():
        return f"{sys.executable} -m wandb"
    found = shutil.which("wandb")
    if found and Path(found).resolve() == exe.resolve():
        return "wandb"
    relative = os.path.relpath(exe)
    return relative if not relative.startswith("..") else str(exe)


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def _wandb_api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        found = netrc.netrc().authenticators(urlparse(_wandb_base_url()).hostname)
    except (OSError, netrc.NetrcParseError):
        return None
    return found[2] if found else None


def _wandb_logged_in() -> bool:
    return _wandb_api_key() is not None


def _wandb_server_problem(timeout: float = 5.0) -> str | None:
    """None when the W&B server answers an authenticated query; else why not, in a few words.
    A server that accepts the connection and then fails (a proxy, TLS, a bad key) is caught
    here in seconds instead of by wandb.init's long retries."""
    import requests

    url = _wandb_base_url()
    try:
        answer = requests.post(f"{url}/graphql", json={"query": "query { viewer { id } }"},
                               auth=("api", _wandb_api_key() or ""), timeout=timeout)
    except requests.exceptions.SSLError:
        return f"TLS failed with {urlparse(url).hostname}"
    except requests.exceptions.ConnectionError:
        return f"{urlparse(url).hostname} does not answer"
    except requests.exceptions.RequestException as err:
        return f"{urlparse(url).hostname} failed ({type(err).__name__})"
    if answer.status_code in (401, 403):
        return f"{urlparse(url).hostname} refused the API key (HTTP {answer.status_code})"
    if answer.status_code != 200:
        return f"{urlparse(url).hostname} answered HTTP {answer.status_code}"
    try:
        answer.json()
    except ValueError:
        return f"{urlparse(url).hostname} did not answer as a W&B server"
    return None


def resolve_wandb_mode(mode: str) -> str:
    """`auto`: online only when logged in and the server answers an authenticated query
    within seconds, else offline (one line says why). WANDB_MODE in the environment always
    wins (tests set it to `disabled`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if not _wandb_logged_in():
        reason = "not logged in (wandb login)"
    else:
        reason = _wandb_server_problem()
        if reason is None:
            return "online"
    print(f"W&B: {reason}; logging offline into the run folder", file=sys.stderr)
    return "offline"


_prewarm: threading.Thread | None = None


def prewarm(logger_cfg) -> None:
    """Import wandb and start its service in the background while the job builds its data
    (Session.__init__), so the run's own start later costs less; nothing for other loggers
    or when W&B is disabled."""
    global _prewarm
    target = str((logger_cfg or {}).get("_target_", ""))
    if (not target.endswith(".WandbRunLogger") or os.environ.get("WANDB_MODE") == "disabled"
            or (logger_cfg.get("mode") == "disabled" and not os.environ.get("WANDB_MODE"))):
        return

    def warm() -> None:
        try:
            import wandb

            wandb.setup()
            wandb.Table(columns=["a"], data=[[0]])  # its first use imports for ~0.2 s
        except Exception:  # noqa: BLE001, S110  (the run's own start reports problems)
            pass

    _prewarm = threading.Thread(target=warm, daemon=True, name="wandb-prewarm")
    _prewarm.start()


def _init_run(kwargs: dict, mode: str):
    """wandb.init; an online start that fails goes on offline with one line."""
    import wandb

    # create_new: every job its own run, also when several jobs are alive in one process (a
    # population's members); wandb's default would hand the second job the first one's run.
    kwargs = {**kwargs, "reinit": "create_new"}
    settings = wandb.Settings(silent=mode != "online", init_timeout=60)
    try:
        return wandb.init(**kwargs, mode=mode, settings=settings), mode
    except Exception as err:  # wandb raises many kinds; the run must go on
        if mode != "online":
            raise
        print(f"W&B: the server failed ({type(err).__name__}: {str(err)[:120]}); "
              "logging offline into the run folder", file=sys.stderr)
        return wandb.init(**kwargs, mode="offline",
                          settings=wandb.Settings(silent=True)), "offline"


class WandbRunLogger(NullRunLogger):
    """One W&B run per job; `wandb.finish()` at the end of every job, so the jobs of a sweep
    that share a process (joblib, Optuna's in-process trials) never share a run.

    The run starts in a background thread (importing wandb and starting its service take
    seconds) while the loop builds and evaluates; the first log call waits for it.
    group: null = the configuration without its seed (set by the runner: seeds of one
    configuration aggregate in the UI). job_type: null = the method. log_model: upload the
    final checkpoint as a `model` artifact.
    """

    def __init__(self, project: str = "metacl", entity: str | None = None, mode: str = "auto",
                 tags: list | None = None, group: str | None = None,
                 job_type: str | None = None, log_model: bool = False):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.group, self.job_type, self.log_model = group, job_type, bool(log_model)
        self.run = None
        self.run_id = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, config, output_dir, name, group, tags=None, job_type=None, run_id=None):
        self.run_id = run_id or new_run_id()
        all_tags = list(dict.fromkeys([*self.tags, *(tags or [])]))  # ordered, no repeats
        kwargs = {
            "project": self.project, "entity": self.entity, "name": name, "id": self.run_id,
            "resume": "allow", "group": self.group or group,
            "job_type": self.job_type or job_type, "tags": [str(t)[:64] for t in all_tags],
            "config": {**config, "git": git_state()}, "dir": output_dir}
        self._thread = threading.Thread(target=self._start, args=(kwargs,), daemon=True,
                                        name="wandb-init")
        self._thread.start()

    def _start(self, kwargs: dict) -> None:
        if _prewarm is not None:
            _prewarm.join()
        try:
            self.run, self.mode = _init_run(kwargs, resolve_wandb_mode(self.mode))
            # Per-task values against the task index; the loss against the batch step.
            self.run.define_metric("trainer/global_step")
            self.run.define_metric("train/*", step_metric="trainer/global_step")
            self.run.define_metric("task")
            for key in ("acc/*", "test/*", "val/*", "time/*"):
                self.run.define_metric(key, step_metric="task")
        except BaseException as err:  # noqa: BLE001  (reported once, by _ready)
            self._error = err

    def _ready(self):
        """The started run (None when W&B could not start at all: the run goes on)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                print(f"W&B could not start ({type(self._error).__name__}: "
                      f"{str(self._error)[:120]}); the run goes on without it",
                      file=sys.stderr)
        return self.run

    # W&B's own step is the run's cumulative batch step, which a resume continues: the rows of
    # a resumed run (and of its offline parts, synced one after the other) never go back.
    def log_metrics(self, metrics, step):
        if self._ready() is not None:
            self.run.log({**metrics, "trainer/global_step": step}, step=step)

    def log_task(self, task, row, metrics, step):
        if self._ready() is not None:
            self.run.log({**_row_metrics(task, row, metrics), "trainer/global_step": step},
                         step=step)

    def log_matrix(self, matrix, png_path, step, name="accuracy_matrix"):
        """The matrix as a long table (after_task, task, accuracy) and, once, its heatmap."""
        if self._ready() is None:
            return
        import wandb

        rows = [[t, u, float(a)] for t, row in enumerate(matrix) for u, a in enumerate(row)]
        values = {name: wandb.Table(columns=["after_task", "task", "accuracy"], data=rows),
                  "trainer/global_step": step}
        if png_path and os.path.exists(png_path):
            values[f"{name}_heatmap"] = wandb.Image(png_path)
        self.run.log(values, step=step)

    def finish(self, summary, status, files=(), exit_code=None, model=None):
        """Summary and artifacts, then wandb.finish. An interrupted run is marked preempting
        (resumable) and ends with its signal's exit code, so W&B does not call it failed."""
        if self._ready() is None:
            return
        self.run.summary.update({**summary, "status": status})
        self._log_artifacts(status, files, model)
        run_dir = getattr(self.run, "dir", None)
        if status == "interrupted":
            self.run.mark_preempting()
        code = 0 if status == "completed" else (exit_code or 1)
        self.run.finish(exit_code=code)
        self.run = None
        if self.mode == "offline" and run_dir:
            sync_dir = os.path.dirname(run_dir.rstrip("/"))
            print(f"W&B logged offline; upload with: {wandb_command()} sync {sync_dir}",
                  file=sys.stderr)

    def _log_artifacts(self, status: str, files, model: str | None) -> None:
        import wandb

        if self.mode == "disabled":
            return
        existing = [f for f in files if os.path.exists(f)]
        if existing:  # results.json (and friends) as a versioned artifact of this run
            artifact = wandb.Artifact(f"results-{self.run.id}", type="results",
                                      metadata={"status": status})
            for path in existing:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        if self.log_model and model and os.path.exists(model):
            artifact = wandb.Artifact(f"model-{self.run.id}", type="model",
                                      metadata={"status": status})
            artifact.add_file(str(model))
            self.run.log_artifact(artifact, aliases=["latest", "final"]
                                  if status == "completed" else ["latest"])
