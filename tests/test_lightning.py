"""Lightning as its users expect: self.log in a method reaches the run's logger at the run's
step, a `callbacks` group on every task's Trainer, train.log at INFO, extras.print_config,
unwrapped output in logs, and the debug variants (overfit, profile, limit)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from typing import ClassVar

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from metacl import checkpoint
from metacl.errors import ConfigError
from metacl.methods.finetune import Finetune
from metacl.runner.main import main as run_main
from metacl.runner.session import Session
from metacl.runner.trainer import check_trainer

from .conftest import ROOT

TINY = ["debug=fast", "method=finetune", "dataset.limit_train_per_task=20"]  # 2 batches a task


class LoggingFinetune(Finetune):
    """Finetune that logs a value of its own, as a Lightning user would."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.log("custom/batch_size", float(batch[0].shape[0]))


class CountingCallback(pl.Callback):
    fits: ClassVar[list] = []

    def on_fit_start(self, trainer, pl_module):
        CountingCallback.fits.append(trainer)


def _csv_rows(out) -> list[dict]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_self_log_in_a_method_reaches_the_run_logger_at_the_run_step(compose, tmp_path):
    out = tmp_path / "run"
    run_main(compose([*TINY, "logger=csv", f"paths.output_dir={out}",
                      "method._target_=tests.test_lightning.LoggingFinetune",
                      "+trainer.log_every_n_steps=1"]))
    rows = [r for r in _csv_rows(out) if r.get("custom/batch_size")]
    steps = [int(r["step"]) for r in rows]
    assert len(rows) == 4 and all(float(r["custom/batch_size"]) == 10 for r in rows)
    # the run's cumulative step across the fresh Trainer of each task, not 0, 1 twice
    assert steps == sorted(steps) and len(set(steps)) == 4 and max(steps) >= 3


def test_callbacks_group_adds_lightning_callbacks_to_every_task(compose, tmp_path):
    out = tmp_path / "run"
    CountingCallback.fits.clear()
    run_main(compose([*TINY, "logger=csv", f"paths.output_dir={out}", "callbacks=lr_monitor",
                      "+callbacks.count._target_=tests.test_lightning.CountingCallback"]))
    assert len(CountingCallback.fits) == 2 and CountingCallback.fits[0] is not \
        CountingCallback.fits[1]  # one fresh Trainer per task, the callback on each
    lr_rows = [r for r in _csv_rows(out) if any(k.startswith("lr-") and v
                                                 for k, v in r.items())]
    assert lr_rows  # LearningRateMonitor needs a logger: the run's


def test_bad_callbacks_and_trainer_callbacks_are_refused_in_one_line(compose, tmp_path):
    cfg = compose([*TINY, f"paths.output_dir={tmp_path}", "+callbacks.bad._target_=no.Such"])
    with pytest.raises(ConfigError, match="callbacks.bad could not be built"):
        Session(cfg, tmp_path)
    cfg = compose([*TINY, "+trainer.callbacks=[]"])
    with pytest.raises(ConfigError, match="callbacks=lr_monitor"):
        check_trainer(cfg.trainer, ("32-true",), "finetune")


def test_train_log_print_config_and_no_wrapping_when_not_a_terminal(tmp_path):
    out = tmp_path / ("a_rather_long_folder_name_" * 4) / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "logger=none",
                           f"hydra.run.dir={out}", "extras.print_config=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "train.log").read_text()
    assert "INFO" in log and "RA" in log and "task 1: RA so far" in log
    assert f"results: {out / 'results.json'}" in proc.stderr  # on one line, unbroken
    assert "method" in proc.stderr and "_target_: metacl.methods.finetune.Finetune" in \
        proc.stderr  # the config tree


def test_debug_overfit_reaches_training_accuracy_one(compose, tmp_path):
    out = tmp_path / "run"
    cfg = compose(["debug=overfit", "method=finetune", f"paths.output_dir={out}"])
    run_main(cfg)
    dm = instantiate(cfg.dataset).build()
    method = Session(cfg, out).build_method(dm.task_info, task_info=dm.task_info)
    checkpoint.restore(method, checkpoint.load(out / "checkpoints" / checkpoint.BOUNDARY_FILE))
    task = dm.tasks[0]
    assert len(dm.tasks) == 1 and len(task.y_train) == 20
    with torch.no_grad():
        predicted = method.predict(dm.prepare_batch(task.x_train, train=False), 0)
    assert (predicted == task.y_train).float().mean() >= 0.95


def test_debug_profile_writes_one_report_per_task_in_the_run_folder(compose, tmp_path):
    out = tmp_path / "run"
    run_main(compose(["debug=profile", "method=finetune", "dataset.limit_train_per_task=20",
                      "dataset.limit_test_per_task=20", f"paths.output_dir={out}"]))
    report = (out / "fit-profile.txt").read_text()
    assert report.count("Profiler Report") == 2 and "run_training_batch" in report


def test_debug_limit_shrinks_the_data_and_keeps_the_trainer_and_logger(compose):
    cfg = compose(["debug=limit"])
    assert cfg.dataset.limit_tasks == 3 and cfg.dataset.limit_train_per_task == 200
    assert cfg.logger._target_.endswith("WandbRunLogger")
    assert cfg.trainer.accelerator == compose([]).trainer.accelerator


def test_outputs_go_under_the_project_wherever_the_command_starts(tmp_path, monkeypatch):
    from metacl.resolvers import project_root

    monkeypatch.delenv("METACL_ROOT_DIR", raising=False)
    assert project_root() == str(ROOT)
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "root"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "METACL_ROOT_DIR"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "logger=none",
                           f"paths.root_dir={root}"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((root / "outputs" / "debug" / "runs").glob("*/results.json"))) == 1
    assert not list(elsewhere.iterdir())
