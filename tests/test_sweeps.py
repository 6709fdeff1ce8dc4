"""Sweeps: the validation split, failed jobs, Optuna searches, launchers, W&B per job.

Two tests start real sweeps through train.py (a 3-trial Optuna search; a 2-job sweep through
hydra-submitit-launcher's local executor with W&B offline); they are the slow ones.
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
    args = {"source": "bundled", "scenario": "mnist_rotations", "n_tasks": 2,
            "samples_per_task": 100, "seed": 0, "validation": 0.2}
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
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "method=er", "method.lr=inf"])
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
    cfg = compose(["debug=fast", f"paths.output_dir={diverged}", "method=er", "method.lr=inf"])
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
    """Two jobs through submitit's local executor, W&B offline; job 1 diverges (lr = inf)."""
    cwd = tmp_path_factory.mktemp("submitit")
    wandb_home = cwd / "wandb_home"
    out = _train_py(
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "debug=fast",
         "dataset.limit_train_per_task=30", "dataset.limit_test_per_task=30",
         "logger=wandb", "method=er", "method.lr=0.1,inf"], cwd,
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_CACHE_DIR=str(wandb_home / "cache"), WANDB_DATA_DIR=str(wandb_home / "data"),
    )
    (sweep,) = (cwd / "outputs" / "debug" / "multiruns").iterdir()
    return out, sweep


def test_submitit_local_two_job_sweep_runs_end_to_end(submitit_sweep):
    out, sweep = submitit_sweep
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((sweep / ".submitit").rglob("*_log.out"))  # really went through submitit
    done, diverged = _jobs(sweep)
    assert "method.lr=0.1," in done.name and "method.lr=inf," in diverged.name
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
    for lr, run_dir in zip(("0.1", "inf"), runs):
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
    (failed_line,) = [line for line in report.markdown.splitlines() if "method.lr=inf" in line]
    assert "mnist_rotations/er" in failed_line
