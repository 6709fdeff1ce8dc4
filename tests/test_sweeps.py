"""Sweeps: the validation split, failed jobs, Optuna searches, launchers, W&B per job.

The tests that start real sweeps through train.py are the slow ones: Optuna searches (3 trials;
failing and diverging trials; all trials failing; a study continued by a rerun and after a
kill) and a 2-job sweep through hydra-submitit-launcher's local executor with W&B offline.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from metacl.data.datamodule import ContinualDataModule
from metacl.errors import ConfigError
from metacl.runner import main as run_module
from metacl.runner.health import DivergedError
from metacl.runner.job import JobInfo
from metacl.runner.main import main as run_main

from .conftest import CONF, ROOT


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _search_configs():
    return sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


# ----------------------------------------------------------------------------- configs
def test_slurm_launcher_documents_partition_gpus_time_and_array_parallelism():
    cfg = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu"
    for key in ("gpus_per_node", "timeout_min", "array_parallelism", "max_num_timeout",
                "cpus_per_task", "mem_gb"):
        assert launcher[key] is not None, key
    text = (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()
    for key in ("partition:", "gpus_per_node:", "timeout_min:", "array_parallelism:"):
        line = next(line for line in text.splitlines() if line.startswith(key))
        assert "#" in line, f"{key} has no comment"


def test_local_parallel_launcher_is_hydras_joblib_pool():
    launcher = _hydra_cfg(["hydra/launcher=local_parallel"]).hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs >= 1


@pytest.mark.parametrize("name", _search_configs())
def test_search_configs_maximise_a_validation_metric_with_a_seeded_sampler(name):
    path = CONF / "hparams_search" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    method = next(d["override /method"] for d in raw["defaults"] if "override /method" in d)
    if not (CONF / "method" / f"{method}.yaml").exists():
        raise AssertionError(f"conf/method/{method}.yaml is missing")
    cfg = _hydra_cfg([f"hparams_search={name}", "debug=fast"])
    assert cfg.optimized_metric.startswith("val/")  # never the test split
    assert cfg.dataset.validation > 0
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.sampler.seed is not None
    assert sweeper.max_failure_rate == 1.0
    for key in sweeper.params:  # every searched key exists in the composed config
        section, leaf = key.split(".", 1)
        assert leaf in cfg[section], key


def test_lamaml_search_covers_opt_lr_alpha_init_and_glances():
    params = yaml.safe_load((CONF / "hparams_search" / "lamaml_optuna.yaml").read_text())
    assert set(params["hydra"]["sweeper"]["params"]) == {
        "method.opt_lr", "method.alpha_init", "method.glances"}


# ----------------------------------------------------------------------------- validation
def _dm(**kwargs):
    from functools import partial

    from metacl.data.scenarios import mnist_rotations
    from metacl.data.sources import load_bundled

    seed = kwargs.pop("seed", 0)
    args = {"source": load_bundled, "seed": seed, "validation": 0.2,
            "scenario": partial(mnist_rotations, n_tasks=2, samples_per_task=100, seed=seed)}
    return ContinualDataModule(**{**args, **kwargs}).build()


def test_mnist_scenarios_get_a_seeded_held_out_validation_split():
    dm = _dm()
    assert dm.has_validation and not _dm(validation=0.0).has_validation
    for task in dm.tasks:
        assert len(task.y_train) + len(task.y_val) == 100
        assert 15 <= len(task.y_val) <= 25  # 20% of every class, rounded per class
        # held out: no validation image is also a training image of the task
        train = {tuple(x.flatten().tolist()) for x in task.x_train}
        assert not any(tuple(x.flatten().tolist()) in train for x in task.x_val)
    again, other = _dm(), _dm(seed=1)
    assert torch.equal(again.tasks[0].x_val, dm.tasks[0].x_val)
    assert not torch.equal(other.tasks[0].y_val, dm.tasks[0].y_val)
    assert len(dm.eval_dataloaders("val")) == 2
    capped = _dm(limit_test_per_task=5, limit_train_per_task=30)
    assert len(capped.tasks[0].y_val) == 5 and len(capped.tasks[0].y_train) == 30
    with pytest.raises(ConfigError, match="validation"):
        _dm(validation=1.0)


def test_validation_metric_without_validation_split_fails_before_training(compose, tmp_path):
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "optimized_metric=val/RA"])
    with pytest.raises(ConfigError, match="dataset.validation"):
        run_main(cfg)
    assert not (tmp_path / "results.json").exists()
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "optimized_metric=bogus"])
    with pytest.raises(ConfigError, match="val/RA"):
        run_main(cfg)


# ----------------------------------------------------------------------------- failed jobs
def test_diverging_single_run_raises_and_records_the_failure(compose, tmp_path):
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "method=er", "method.lr=1e30"])
    with pytest.raises(DivergedError):
        run_main(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["error"].startswith("DivergedError: training loss became")


def test_failing_jobs_of_a_multirun_are_recorded_and_return_nan(compose, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(run_module, "job_info",
                        lambda cfg: JobInfo(name="job", multirun=True, hydra={"job_num": 3}))
    diverged = tmp_path / "diverged"
    cfg = compose(["debug=fast", f"paths.output_dir={diverged}", "method=er", "method.lr=1e30"])
    assert math.isnan(run_main(cfg))
    results = json.loads((diverged / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["error"].startswith("DivergedError: training loss became nan in task 0")

    crashed = tmp_path / "crashed"  # fails before any result exists: a skeleton is written
    cfg = compose(["debug=fast", f"paths.output_dir={crashed}", "dataset.source=floppy"])
    assert math.isnan(run_main(cfg))
    results = json.loads((crashed / "results.json").read_text())
    assert results["status"].startswith("failed: ConfigError") and "floppy" in results["status"]
    assert results["accuracy_matrix"] == [] and results["config"]["dataset"]["source"] == "floppy"
    err = capsys.readouterr().err
    assert "error:" in err and "the other jobs go on" in err


# ----------------------------------------------------------------------------- real sweeps
def _train_py(args, cwd, **env):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", **env}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if (p / "results.json").exists()),
                  key=lambda p: int(p.name.split("_", 1)[0]))


def test_optuna_search_of_three_trials_maximises_the_validation_metric(tmp_path):
    out = _train_py(["hparams_search=er_optuna", "debug=fast", "hydra.sweeper.n_trials=3",
                     "dataset.limit_train_per_task=30", "dataset.limit_test_per_task=30",
                     "method.glances=1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    jobs = _jobs(sweep)
    assert len(jobs) == 3
    values, params = [], []
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed"
        assert results["config"]["optimized_metric"] == "val/RA"
        val = results["validation"]
        assert len(val["accuracy_matrix"]) == 2 and set(val["metrics"]) >= {"RA", "BTI"}
        values.append(val["metrics"]["RA"])
        method = results["config"]["method"]
        assert 0.003 <= method["lr"] <= 0.3 and method["replay_batch_size"] in (5, 10, 20, 50)
        params.append((method["lr"], method["replay_batch_size"]))
    assert len(set(params)) == 3  # three different trials
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))  # the validation RA, not the test RA


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory):
    """Two jobs through submitit's local executor, W&B offline; job 1 diverges (lr = 1e30)."""
    cwd = tmp_path_factory.mktemp("submitit")
    wandb_home = cwd / "wandb_home"
    out = _train_py(
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "debug=fast",
         "dataset.limit_train_per_task=30", "dataset.limit_test_per_task=30",
         "logger=wandb", "method=er", "method.lr=0.1,1e30"], cwd,
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"), WANDB_DATA_DIR=str(wandb_home / "data"),
    )
    (sweep,) = (cwd / "outputs" / "debug" / "multiruns").iterdir()
    return out, sweep


def test_submitit_local_two_job_sweep_runs_end_to_end(submitit_sweep):
    out, sweep = submitit_sweep
    # every job ran; the sweep exits 1 because one job diverged, and says which
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 of 2 jobs completed" in out.stderr
    assert list((sweep / ".submitit").rglob("*_log.out"))  # really went through submitit
    done, diverged = _jobs(sweep)
    assert "method.lr=0.1," in done.name and "method.lr=1e+30," in diverged.name  # Hydra: 1e+30
    results = json.loads((done / "results.json").read_text())
    assert results["status"] == "completed" and len(results["accuracy_matrix"]) == 2
    assert results["config"]["hydra"]["job_num"] == 0
    assert results["config"]["hydra"]["mode"] == "MULTIRUN"
    # the diverging job is recorded as failed and did not stop the other one
    failed = json.loads((diverged / "results.json").read_text())
    assert failed["status"] == "diverged" and failed["error"].startswith("DivergedError")


def _wandb_run(job: Path) -> Path:
    (run_dir,) = (job / "wandb").glob("offline-run-*")
    return run_dir


def test_wandb_offline_writes_one_run_per_job_with_the_matrix_table(submitit_sweep):
    from .wandb_files import of_type, records

    _, sweep = submitit_sweep
    done, diverged = _jobs(sweep)
    runs = [_wandb_run(done), _wandb_run(diverged)]
    assert runs[0].name != runs[1].name  # one run per job
    groups = []
    for lr, run_dir in zip(("0.1", "1e+30"), runs):
        (run,) = of_type(records(run_dir), "run")
        # the group is the configuration without its seed; the sweep is a tag
        assert run["run_group"].startswith("er-mnist_rotations-")
        assert f"sweep:{sweep.name}" in run["tags"] and "multirun" in run["tags"]
        groups.append(run["run_group"])
        # the run's name comes from the overrides
        assert run["display_name"].startswith(
            "er-mnist_rotations-seed0-dataset.limit_train_per_task=30,")
        assert f"method.lr={lr}" in run["display_name"]
        assert run["job_type"] == "er"  # the method
        data = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert f"results-{run_dir.name.rsplit('-', 1)[1]}".encode() in data  # artifact
    assert groups[0] != groups[1]  # two learning rates: two configurations
    # the whole matrix as a long table, equal to results.json's; one heatmap at the end
    (table,) = (runs[0] / "files" / "media" / "table").glob("accuracy_matrix_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["after_task", "task", "accuracy"]
    matrix = json.loads((done / "results.json").read_text())["accuracy_matrix"]
    assert table["data"] == [[t, u, a] for t, row in enumerate(matrix)
                             for u, a in enumerate(row)]
    images = list((runs[0] / "files" / "media" / "images").glob("*.png"))
    assert len(images) == 1  # one heatmap, at the end
    assert not (runs[1] / "files" / "media" / "table").exists()  # failed: no final matrix


def test_report_over_the_sweep_lists_the_diverged_job(submitit_sweep, tmp_path):
    from metacl.report import build_report

    _, sweep = submitit_sweep
    report = build_report([sweep], tmp_path / "report", plots=False)
    assert len(report.cells) == 1 and len(report.cells[0].runs) == 1
    assert len(report.failed) == 1
    (failed_line,) = [line for line in report.markdown.splitlines() if "method.lr=1e+30" in line]
    assert "mnist_rotations/er" in failed_line


# ----------------------------------------------------------------------------- failed trials
# (issue 17, items 1 and 2: hydra_plugins/metacl_sweeper, the sweeper of conf/hparams_search/)
def _job_return(value, num):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    ret = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
    ret.hydra_cfg = OmegaConf.create({"hydra": {"job": {"num": num}}})
    return ret


def test_a_job_that_returns_nan_or_inf_reaches_the_plugin_as_a_failed_job():
    from hydra.core.utils import JobStatus

    from hydra_plugins.metacl_sweeper.optuna_sweeper import TrialFailed, _FailedJobsAsFailures

    class Launcher:
        def launch(self, overrides, initial_job_idx):
            values = [0.5, float("nan"), float("inf"), 0.0]
            return [_job_return(v, initial_job_idx + i) for i, v in enumerate(values)]

    launcher = _FailedJobsAsFailures(Launcher())
    returns = launcher.launch([()] * 4, initial_job_idx=7)
    assert [r.status for r in returns] == [JobStatus.COMPLETED, JobStatus.FAILED,
                                           JobStatus.FAILED, JobStatus.COMPLETED]
    assert returns[0].return_value == 0.5
    with pytest.raises(TrialFailed, match="job 8 returned nan"):
        returns[1].return_value  # noqa: B018 - the plugin reads it like this, then tells FAIL
    assert (launcher.launched, launcher.completed) == (4, 2)


def test_search_studies_live_in_a_folder_that_only_the_command_decides():
    def storage(*overrides):
        return _hydra_cfg(["hparams_search=er_optuna", *overrides]).hydra.sweeper.storage

    plain = storage()
    assert plain == "sqlite:///outputs/er_optuna/searches/er_optuna-" \
        f"{plain.split('er_optuna-')[-1].split('/')[0]}/optuna.db"
    # hydra.* overrides (n_trials, the launcher), the logger and the trainer keep the study
    assert storage("hydra.sweeper.n_trials=50", "logger=csv", "trainer=cpu") == plain
    assert storage("dataset=mnist_permutations") != plain  # another search, another study
    assert storage("hydra.sweeper.study_name=mine").startswith(
        "sqlite:///outputs/er_optuna/searches/mine-")
    assert _hydra_cfg(["hparams_search=lamaml_optuna"]).hydra.sweeper.storage.startswith(
        "sqlite:///outputs/lamaml_optuna/searches/lamaml_optuna-")


def _study(cwd: Path):
    import optuna
    import sqlalchemy

    assert int(sqlalchemy.__version__.split(".")[0]) < 2, (
        "optuna 2.10's sqlite studies need SQLAlchemy < 2 (pyproject.toml): run `make install`")
    (db,) = (cwd / "outputs").glob("*/searches/*/optuna.db")
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    return optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}")


SMALL = ["debug=fast", "dataset.limit_train_per_task=30", "dataset.limit_test_per_task=30",
         "method.glances=1"]


def test_failed_and_diverged_trials_are_recorded_and_the_search_goes_on(tmp_path):
    # replay_batch_size=-1 is refused by the method (a crash before training), lr=1e30 diverges
    out = _train_py(["hparams_search=er_optuna", "hydra.sweeper.n_trials=6", *SMALL,
                     "method.replay_batch_size=choice(-1,10)", "method.lr=choice(0.05,1e30)"],
                    tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Values were told" not in out.stderr
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    jobs = _jobs(sweep)
    assert len(jobs) == 6  # every trial ran, after the failures too
    statuses, best = [], None
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        method = results["config"]["method"]
        if method["replay_batch_size"] == -1:
            assert results["status"].startswith("failed: ConfigError")
        elif method["lr"] > 1:
            assert results["status"] == "diverged"
        else:
            assert results["status"] == "completed"
            ra = results["validation"]["metrics"]["RA"]
            best = ra if best is None else max(best, ra)
        statuses.append(results["status"])
    assert "completed" in statuses and "diverged" in statuses
    assert any(s.startswith("failed") for s in statuses)
    summary = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(best)
    n_complete = statuses.count("completed")
    assert summary["trials"] == {"complete": n_complete, "fail": 6 - n_complete}
    states = [t.state.name for t in _study(tmp_path).trials]  # Optuna's own record
    assert states == ["COMPLETE" if s == "completed" else "FAIL" for s in statuses]


def test_a_search_whose_every_trial_fails_still_writes_its_results(tmp_path):
    out = _train_py(["hparams_search=er_optuna", "hydra.sweeper.n_trials=2", *SMALL,
                     "method.lr=inf", "hydra.sweeper.storage=null"], tmp_path)
    # the search ran every trial and wrote its results, and exits 1: no trial completed
    assert out.returncode == 1, out.stderr[-3000:]
    assert "0 of 2 jobs completed" in out.stderr
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    summary = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert summary["best_value"] is None and summary["best_params"] is None
    assert summary["trials"] == {"complete": 0, "fail": 2}
    assert not (tmp_path / "outputs" / "debug" / "searches").exists()  # storage=null: memory


# ----------------------------------------------------------------------------- persistent study
def _trials(study):
    return [(t.number, t.state.name, t.params, t.value) for t in study.trials]


def test_rerunning_a_search_continues_its_study(tmp_path):
    args = ["hparams_search=er_optuna", *SMALL]
    first = _train_py([*args, "hydra.sweeper.n_trials=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _trials(_study(tmp_path))
    assert [t[1] for t in before] == ["COMPLETE", "COMPLETE"]

    more = _train_py([*args, "hydra.sweeper.n_trials=4"], tmp_path)  # the same command, 4 now
    assert more.returncode == 0, more.stderr[-3000:]
    assert "2 trials finished earlier" in more.stdout + more.stderr
    after = _trials(_study(tmp_path))
    assert len(after) == 4 and after[:2] == before  # earlier trials kept as they were
    params = [tuple(sorted(t[2].items())) for t in after]
    assert len(set(params)) == 4  # the continuation did not repeat the seeded sequence
    sweeps = sorted((tmp_path / "outputs" / "debug" / "multiruns").iterdir())
    assert len(sweeps) == 2
    assert [p.name.split("_")[0] for p in _jobs(sweeps[1])] == ["2", "3"]  # job n = trial n
    summary = yaml.safe_load((sweeps[1] / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(max(t[3] for t in after))
    assert summary["trials"] == {"complete": 4, "fail": 0}

    again = _train_py([*args, "hydra.sweeper.n_trials=4"], tmp_path)  # nothing left to run
    assert again.returncode == 0, again.stderr[-3000:]
    assert _trials(_study(tmp_path)) == after
    newest = max((tmp_path / "outputs" / "debug" / "multiruns").iterdir())
    assert not _jobs(newest) and (newest / "optimization_results.yaml").exists()



def test_a_killed_search_continues_with_its_finished_trials(tmp_path):
    import signal
    import sqlite3
    import time

    args = [sys.executable, str(ROOT / "train.py"), "hparams_search=er_optuna",
            "hydra.sweeper.n_trials=3", *SMALL]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    completed = 0
    deadline = time.monotonic() + 300
    try:
        while completed < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            for db in (tmp_path / "outputs").glob("*/searches/*/optuna.db"):
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                        completed = con.execute(
                            "select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
                except sqlite3.Error:
                    pass  # the tables are still being created
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what a node failure or `kill -9` does
        proc.wait()
    assert completed >= 1, "the search never finished a trial"
    killed = _trials(_study(tmp_path))
    finished = [t for t in killed if t[1] == "COMPLETE"]
    assert len(finished) < 3  # it really was stopped early

    out = _train_py(args[2:], tmp_path)  # the same command again
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = _trials(_study(tmp_path))
    assert [t for t in resumed if t in finished] == finished  # kept, unchanged
    assert sum(t[1] == "COMPLETE" for t in resumed) == 3  # only the rest of n_trials ran
