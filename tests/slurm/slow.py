"""A Lightning callback that sleeps after every training batch: a run that lasts long on the
clock but costs little CPU, for tests that wait for a scheduler's clock (a SLURM time limit)
while other tests use the cores. It does not touch the training: the run's results are those
of the same run without it. A requeued job (SLURM sets SLURM_RESTART_COUNT) no longer
sleeps: once the time limit has been reached, the rest of the run only has to finish."""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl


class SlowBatches(pl.Callback):
    def __init__(self, seconds: float):
        requeued = os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")
        self.seconds = 0.0 if requeued else float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
