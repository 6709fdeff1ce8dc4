"""Real SLURM jobs through `hydra/launcher=slurm` (hydra-submitit-launcher): a multirun
completes; a job requeued with `scontrol requeue` (SIGTERM) and one signalled with
`scancel --signal=USR2` (what pre-emption sends) inside a task resume from their checkpoints
to the matrix of an uninterrupted run; a job that reaches its time limit is signalled by SLURM,
requeued by submitit and completes. Needs a cluster (conftest.py; scripts/slurm_cluster.sh).

Jobs run `debug=fast` configs on the CPU (deterministic); the uninterrupted references run in
this process while the jobs run, as in tests/test_reliability.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metacl.runner.main import main as run_main

from ..conftest import compose_cfg
from .sweep import Sweep

MATRIX_KEYS = ("accuracy_matrix", "accuracy_matrix_agnostic", "accuracy_before", "metrics")

# ER with 3 tasks of 100 batches (x5 glances, 2-4 s a task on one core) and an in-task
# checkpoint every 5 batches: the jobs are interrupted at their first checkpoint in task 1,
# 95 batches before its end (the signal takes a fraction of a second to arrive).
INTERRUPTED = ["debug=fast", "method=er", "dataset.limit_tasks=3",
               "dataset.limit_train_per_task=1000", "checkpoint.every_n_steps=5"]


def _reference(overrides: list[str], out: Path) -> dict:
    run_main(compose_cfg([*overrides, f"paths.output_dir={out}"]))
    return json.loads((out / "results.json").read_text())


def _assert_same_results(resumed: dict, reference: dict) -> None:
    assert resumed["status"] == "completed"
    for key in MATRIX_KEYS:
        assert resumed.get(key) == reference.get(key), key


def test_a_multirun_through_the_slurm_launcher_completes(tmp_path):
    sweep = Sweep(tmp_path, ["debug=fast", "seed=0,1"]).start()
    try:
        output = sweep.finish(timeout=240)
    finally:
        sweep.cancel()
    assert sweep.proc.returncode == 0, output[-3000:]
    for n in (0, 1):
        assert sweep.results(n)["status"] == "completed", sweep.log(n)[-3000:]
        assert "Job completed successfully" in sweep.log(n)  # run by submitit in a SLURM job
    assert [sweep.results(n)["config"]["seed"] for n in (0, 1)] == [0, 1]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Two identical jobs (`seed=0,0`): job 0 is requeued (`scontrol requeue`: SLURM sends
    SIGTERM, then starts the job again), job 1 gets SIGUSR2 (`scancel --signal=USR2`, as on
    pre-emption: submitit requeues it), each once it is inside its second task."""
    root = tmp_path_factory.mktemp("interrupted")
    sweep = Sweep(root, [*INTERRUPTED, "seed=0,0"]).start()
    try:
        sweep.interrupt_in_task(1, {0: sweep.requeue, 1: lambda n: sweep.signal(n, "USR2")},
                                timeout=240)
        reference = _reference(INTERRUPTED, root / "reference")  # while the jobs resume
        output = sweep.finish(timeout=240)
    finally:
        sweep.cancel()
    assert sweep.proc.returncode == 0, output[-3000:]
    return sweep, reference


def _resumed_inside_task_1(log: str) -> bool:
    return "resuming" in log and "at task 1, batch" in log


def test_a_requeued_job_resumes_to_the_uninterrupted_matrix(interrupted):
    sweep, reference = interrupted
    log = sweep.log(0)
    # srun, killed with the batch step, may take the run's last lines ("stopped by SIGTERM")
    # with it; the resume line of the second run is always there.
    assert "DUE TO JOB REQUEUE" in log, log[-3000:]
    assert sweep.events(0, "Caught signal SIGUSR2 on") == 0, log[-3000:]  # SIGTERM only
    assert _resumed_inside_task_1(log), log[-3000:]
    _assert_same_results(sweep.results(0), reference)


def test_a_preempted_job_resumes_to_the_uninterrupted_matrix(interrupted):
    sweep, reference = interrupted
    log = sweep.log(1)
    assert sweep.events(1, "Caught signal SIGUSR2 on") == 1, log[-3000:]
    assert "Requeued job" in log, log[-3000:]
    assert _resumed_inside_task_1(log), log[-3000:]
    _assert_same_results(sweep.results(1), reference)


# 3 tasks of 100 ER batches that each sleep 0.25 s (tests/slurm/slow.py): 75 s of training on
# the clock for a few seconds of CPU, so the job is still training when SLURM's time-limit
# warning comes, whenever that is (below), while the other tests keep the cores; the requeued
# job has 10 minutes for the rest. The reference runs the same config without the sleeps.
LONG = ["debug=fast", "method=er", "dataset.limit_tasks=3", "dataset.limit_train_per_task=1000",
        "checkpoint.every_n_steps=10"]
SLOW = ["+callbacks.slow._target_=tests.slurm.slow.SlowBatches", "+callbacks.slow.seconds=0.25"]


def test_a_job_at_its_time_limit_is_requeued_and_completes(tmp_path):
    """timeout_min=1, signal_delay_s=10: slurmctld checks time limits every 30 s and sends
    the warning up to 30 s early, so SLURM's SIGUSR2 comes 20-50 s after the job starts, once
    the run trains (Python and the run start in 5-20 s). The run checkpoints, submitit
    requeues the job, the requeued job resumes. A resumed run would be signalled again 30 s
    later (and resume again: seen 4 times in a row in one job); to keep the test short, the
    requeued job is given 10 minutes, so it finishes in its second run."""
    sweep = Sweep(tmp_path, [*LONG, *SLOW, "seed=0"], timeout_min=1,
                  launcher=("hydra.launcher.signal_delay_s=10",), requeued_time_limit=10)
    sweep.start()
    try:
        reference = _reference(LONG, tmp_path / "reference")
        output = sweep.finish(timeout=400)
    finally:
        sweep.cancel()
    assert sweep.proc.returncode == 0, output[-3000:]
    log = sweep.log(0)
    signals = sweep.events(0, "Caught signal SIGUSR2 on")
    assert signals > 0, f"the job ended before its time limit: make LONG longer\n{log[-3000:]}"
    assert signals == 1 and "this job is timed-out" in log, log[-3000:]
    assert "Requeued job" in log and "resuming" in log, log[-3000:]
    _assert_same_results(sweep.results(0), reference)
