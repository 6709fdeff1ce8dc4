"""hydra-optuna-sweeper 1.3.0, plus what a long search needs (issue 17, items 1 and 2).

``MetaclOptunaSweeper`` is the plugin's ``OptunaSweeper`` with two additions, selected in
``conf/hparams_search/*.yaml`` through ``hydra.sweeper._target_``; every option is the plugin's.

- **A failed trial does not end the search.** A metacl job that crashes or diverges inside a
  multirun records its status in results.json and returns NaN (``metacl.runner.main.main``). The plugin
  tells Optuna that NaN as a COMPLETE value, Optuna refuses it, and the plugin's own fallback
  then passes the NaN again with state FAIL, which Optuna refuses too: the sweep died. Here a
  job that returns NaN/inf is handed to the plugin as a failed job (its exception is
  ``TrialFailed``), the path the plugin already takes for jobs that raise: the trial is told
  FAIL with no value, and ``max_failure_rate`` decides whether the search goes on (1.0 in our
  configs: always). A search whose every trial failed still writes
  ``optimization_results.yaml`` (best_params/best_value null).
- **A persistent study continues.** With ``storage`` set (our configs default to
  ``sqlite:///outputs/<task_name>/searches/<study>/optuna.db``, stable across reruns) the
  sweeper makes the database's folder, counts the trials the study has already finished
  (complete, failed or pruned) and launches only the rest of ``n_trials``. Job numbers continue
  from the study's trial numbers, so job folder ``<n>_...`` is Optuna's trial n. Trials left
  RUNNING by a killed search are not counted (they never finished) and are left as they are:
  another process may still be running them. A seeded sampler is reseeded with seed + the
  number of trials the study holds, so the continuation does not repeat earlier parameters.

``optimization_results.yaml`` also gets ``trials: {complete, failed, ...}``, counted over the
whole study.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"


def search_name(study_name: str, override_dirname: str) -> str:
    """The folder of a search's study: the study name, plus a short hash of the command's
    overrides (``hydra.job.override_dirname``: logger, trainer, data_dir... left out) when there
    are any, so the same command always finds its study and a different one never does.
    Used as ``${metacl.search_name:...}`` in conf/hparams_search/*.yaml."""
    if not override_dirname:
        return str(study_name)
    digest = hashlib.sha1(str(override_dirname).encode(), usedforsecurity=False).hexdigest()
    return f"{study_name}-{digest[:8]}"


# Hydra imports every hydra_plugins module before it composes a config, so the resolver is
# there for conf/hparams_search/*.yaml (the scanner may import this module twice).
if not OmegaConf.has_resolver("metacl.search_name"):
    OmegaConf.register_new_resolver("metacl.search_name", search_name)


class TrialFailed(RuntimeError):
    """A job finished but returned no usable value (NaN/inf: it failed or diverged)."""


def _not_finite(value: Any) -> bool:
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False  # not a number at all: the plugin reports that itself


class _FailedJobsAsFailures:
    """Wraps the launcher: a job that returned NaN/inf comes back as a FAILED JobReturn."""

    def __init__(self, launcher: Any) -> None:
        self._launcher = launcher
        self.launched = 0
        self.completed = 0

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        returns = self._launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        for ret in returns:
            self.launched += 1
            if ret.status == JobStatus.COMPLETED and _not_finite(ret._return_value):
                ret.status = JobStatus.FAILED
                ret.return_value = TrialFailed(
                    f"job {ret.hydra_cfg.hydra.job.num if ret.hydra_cfg else '?'} returned "
                    f"{ret._return_value}: it failed or diverged (see its results.json)")
            elif ret.status == JobStatus.COMPLETED:
                self.completed += 1
        return returns

    def __getattr__(self, name: str) -> Any:
        return getattr(self._launcher, name)


def sqlite_path(storage: Any) -> Path | None:
    """The file of a ``sqlite:///<path>`` storage URL (relative to the working directory)."""
    if isinstance(storage, str) and storage.startswith(_SQLITE):
        return Path(storage[len(_SQLITE):])
    return None


def _rdb_storage_works(storage: Any) -> bool:
    """False for a database URL under SQLAlchemy >= 2, which optuna 2.10's RDB storage predates:
    it leaves alembic's connections open ('database is locked', a failed assertion)."""
    if not isinstance(storage, str) or "://" not in storage:
        return True
    import sqlalchemy

    return int(sqlalchemy.__version__.split(".")[0]) < 2


def _trial_counts(trials) -> dict[str, int]:
    counts = {"complete": 0, "fail": 0}
    for trial in trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    return counts


class MetaclOptunaSweeper(OptunaSweeper):
    """The plugin's Optuna sweeper; failed trials are told FAIL, persistent studies continue."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweeper.launcher = _FailedJobsAsFailures(self.sweeper.launcher)

    def _load_study(self):
        import optuna

        impl = self.sweeper
        if impl.storage is None or impl.study_name is None:
            return None
        try:
            return optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:  # no such study yet
            return None

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if not _rdb_storage_works(impl.storage):
            import sqlalchemy

            log.error("hydra.sweeper.storage=%s needs SQLAlchemy < 2 with optuna 2.10 (found %s; "
                      "pyproject.toml pins it: reinstall with `make install`); this search "
                      "keeps its study in memory and cannot be continued", impl.storage,
                      sqlalchemy.__version__)
            impl.storage = None
        database = sqlite_path(impl.storage)
        if database is not None and not database.parent.is_dir():
            database.parent.mkdir(parents=True)
            # which command this study belongs to, for whoever lists outputs/*/searches/
            OmegaConf.save(OmegaConf.create({"overrides": list(impl.config.hydra.overrides.task)}),
                           database.parent / "overrides.yaml")
        study = self._load_study()
        if study is not None:
            finished = [t for t in study.trials if t.state.is_finished()]
            counts = _trial_counts(study.trials)
            impl.n_trials = max(0, impl.n_trials - len(finished))
            impl.job_idx = len(study.trials)  # job <n> is trial <n>
            self._reseed_sampler(offset=len(study.trials))
            log.warning("continuing study '%s' in %s: %d trials finished earlier (%s), %d to go",
                        impl.study_name, impl.storage, len(finished),
                        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), impl.n_trials)
        # Hydra makes the sweep folder when it launches a job; with no trial left to run the
        # plugin would fail to write optimization_results.yaml there.
        Path(str(impl.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        try:
            impl.sweep(arguments)
        except ValueError:
            # what optuna's best_trial raises when no trial of the study has completed
            if not self._no_trial_completed():
                raise
            log.error("no trial of the search completed (%d launched, all failed); see each "
                      "job's results.json", impl.launcher.launched)
            self._write_results({"name": "optuna", "best_params": None, "best_value": None})
            return
        self._write_results(None)

    def _no_trial_completed(self) -> bool:
        import optuna

        study = self._load_study()
        if study is not None:
            return all(t.state != optuna.trial.TrialState.COMPLETE for t in study.trials)
        return self.sweeper.launcher.launched > 0 and self.sweeper.launcher.completed == 0

    def _reseed_sampler(self, offset: int) -> None:
        """A seeded sampler would start its sequence again and repeat the finished trials'
        parameters (TPE samples at random for its first n_startup_trials): a continued study
        gets the seed plus the number of trials it holds, still the same for the same rerun."""
        from hydra.utils import instantiate

        conf = self.sweeper.config.hydra.sweeper.sampler
        if conf.get("seed") is not None and not conf.get("_partial_", False):
            self.sweeper.sampler = instantiate(conf, seed=conf.seed + offset)

    def _write_results(self, results: dict | None) -> None:
        """optimization_results.yaml (the plugin's, or `results` if it wrote none), plus the
        trial counts of the whole study."""
        path = Path(str(self.sweeper.config.hydra.sweep.dir)) / "optimization_results.yaml"
        content = OmegaConf.to_container(OmegaConf.load(path)) if results is None else results
        study = self._load_study()
        if study is not None:
            content["trials"] = _trial_counts(study.trials)
        else:  # in memory: this invocation's trials
            failed = self.sweeper.launcher.launched - self.sweeper.launcher.completed
            content["trials"] = {"complete": self.sweeper.launcher.completed, "fail": failed}
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(content), path)
