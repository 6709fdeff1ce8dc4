"""HAT's plateau schedule (schedule=hat): lr / 3 on plateaus, stop below lr_min, best restored."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn

from metacl.errors import ConfigError
from metacl.runner.main import main as run_main
from metacl.schedule import PlateauSchedule


class Weights(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(1, 1)


def drive(schedule, losses):
    """Run the schedule's hooks over epochs whose validation losses are `losses`; the module's
    weight is set to the epoch number before each epoch ends."""
    module = Weights()
    opt = torch.optim.SGD(module.parameters(), lr=1.0, momentum=0.9)
    trainer = SimpleNamespace(optimizers=[opt], should_stop=False, datamodule=None)
    schedule.on_train_start(trainer, module)
    lrs = []
    feed = iter(losses)
    schedule.validation_loss = lambda m, dm: next(feed)
    for epoch, _ in enumerate(losses, start=1):
        with torch.no_grad():
            module.backbone.weight.fill_(epoch)
        schedule.on_train_epoch_end(trainer, module)
        lrs.append(opt.param_groups[0]["lr"])
        if trainer.should_stop:
            break
    schedule.on_train_end(trainer, module)
    return lrs, float(module.backbone.weight.detach()), trainer


def test_lr_divides_after_patience_and_training_stops_below_lr_min():
    schedule = PlateauSchedule(lr=0.05, lr_factor=3.0, lr_patience=2, lr_min=0.004)
    # best at epoch 2; then never better: /3 after epochs 4 and 6, below 0.004 at epoch 8
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9]
    lrs, weight, trainer = drive(schedule, losses)
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.05 / 3, 0.05 / 3, 0.05 / 9, 0.05 / 9, 0.05 / 9])
    assert trainer.should_stop and schedule.epochs_per_task == [8]
    assert weight == 2.0  # the best validation epoch's weights are restored


def test_improvement_resets_the_patience():
    schedule = PlateauSchedule(lr=0.05, lr_patience=2, lr_min=1e-4)
    lrs, weight, trainer = drive(schedule, [1.0, 1.1, 0.9, 1.0, 0.8, 1.0])
    assert lrs == [0.05] * 6 and not trainer.should_stop and weight == 5.0


def test_bad_settings_and_missing_validation_are_one_line_errors():
    with pytest.raises(ConfigError, match="lr_factor=1"):
        PlateauSchedule(lr_factor=1)
    with pytest.raises(ConfigError, match=r"set dataset.validation"):
        PlateauSchedule().check(SimpleNamespace(has_validation=False))


def test_schedule_runs_under_a_real_trainer_and_stops_early(compose, tmp_path):
    pl.seed_everything(0, verbose=False)
    # a large rate on 40 digits: the validation loss soon stops improving
    cfg = compose(["debug=fast", "method=finetune", "schedule=hat", "++dataset.validation=0.2",
                   "method.n_epochs=100", "schedule.lr=0.5", "schedule.lr_patience=1",
                   "schedule.lr_min=0.1", "dataset.limit_tasks=1"])
    dm = instantiate(cfg.dataset).build()
    info = dm.task_info
    method = instantiate(cfg.method, _partial_=True)(
        backbone=instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs),
        task_info=info)
    dm.batch_size = method.batch_size
    schedule = instantiate(cfg.schedule)
    method.before_task(0, dm)
    dm.set_task(0)
    trainer = pl.Trainer(max_epochs=100, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[schedule])
    trainer.fit(method, datamodule=dm)
    # 0.5 -> 0.167 -> 0.056 < 0.1: stopped by the plateau rule, long before 100 epochs
    (epochs,) = schedule.epochs_per_task
    assert 2 <= epochs < 100
    best = schedule.validation_loss(method, dm)
    assert best == pytest.approx(schedule.best, rel=1e-5)  # the best epoch's weights are back


def test_end_to_end_run_with_the_schedule_and_its_refusal_without_validation(compose, tmp_path):
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "method=hat", "schedule=hat",
                   "++dataset.validation=0.2", "method.n_epochs=3"])
    assert cfg.trainer.max_epochs == 3
    run_main(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed" and len(results["method_metrics"]) == 2
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "schedule=hat"])
    with pytest.raises(ConfigError, match="validation"):
        run_main(cfg)
