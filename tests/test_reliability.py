"""Reliability: exact resume after a stop (in-process for every method, real killed subprocesses
for finetune / ER / La-MAML), checkpoint contents, resume refusals, few-shot state round trips.

The bad-input table is in test_validation.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metacl import checkpoint
from metacl.checkpoint import Interrupted
from metacl.errors import ConfigError
from metacl.runner.callbacks import EpisodicCheckpoints, InTaskCheckpoints
from metacl.runner.health import DivergedError
from metacl.runner.main import main as run_main

from .conftest import CONF, ROOT


def _protocol(path: Path) -> str:
    return getattr(get_class(OmegaConf.load(path)._target_), "protocol", "continual")


CONTINUAL = sorted(p.stem for p in (CONF / "method").glob("*.yaml")
                   if _protocol(p) == "continual")
EPISODIC = sorted(p.stem for p in (CONF / "method").glob("*.yaml")
                  if _protocol(p) == "episodic")
MATRIX_KEYS = ("accuracy_matrix", "accuracy_matrix_agnostic", "accuracy_before", "metrics")


@pytest.fixture(autouse=True)
def _bundled_digits_read_once(monkeypatch):
    """Every in-process run here reads the same bundled digits: parse the file once."""
    from metacl.data import sources

    cached = _BUNDLED.get("split") or _BUNDLED.setdefault("split", sources.load_bundled())
    # conf/dataset/source/bundled.yaml's _target_ is looked up on the module at each run.
    monkeypatch.setattr(sources, "load_bundled",
                        sources.with_facts(sources.load_bundled.facts)(lambda: cached))


_BUNDLED: dict = {}


def _cheap(method: str) -> list[str]:
    """Fewer repeated updates per batch: the resume path is the same, the test much faster."""
    keys = OmegaConf.load(CONF / "method" / f"{method}.yaml")
    return [f"method.{k}=1" for k in ("glances", "batches_per_example") if k in keys]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


_ORIGINAL_CALL = InTaskCheckpoints.__call__


def _stop_at(monkeypatch, at_step: int, signum=signal.SIGTERM):
    """Deliver a real signal to this process after training batch `at_step` (global count)."""
    original = InTaskCheckpoints.__call__

    def call(self, stream, trainer, pl_module, batch_idx):
        if stream.step == at_step:
            os.kill(os.getpid(), signum)
        return original(self, stream, trainer, pl_module, batch_idx)

    monkeypatch.setattr(InTaskCheckpoints, "__call__", call)


# ------------------------------------------------------------------------------ every method
# `random` trains nothing (no batch to stop at); its state is covered by the boundary checkpoint
@pytest.mark.parametrize("method", [m for m in CONTINUAL if m != "random"])
def test_a_stopped_run_resumes_to_the_same_matrix(compose, tmp_path, monkeypatch, method):
    """SIGTERM inside the second task, resume=true: the matrices equal an uninterrupted run's
    bit for bit (CPU, deterministic). Covers every method's state_dict (memories, counters,
    learned rates, Fisher, exemplars, frozen copies) and optimizer state."""
    common = ["debug=fast", f"method={method}", *_cheap(method), "dataset.n_tasks=2",
              "dataset.limit_train_per_task=20", "checkpoint.every_n_steps=1",
              "method.batch_size=10", "method.n_epochs=1"]  # 2 batches per task
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_main(compose([*common, f"paths.output_dir={full_dir}"]))
    full = _results(full_dir)

    _stop_at(monkeypatch, 3)  # 2 batches per task: after the first batch of task 1
    with pytest.raises(Interrupted) as stopped:
        run_main(compose([*common, f"paths.output_dir={cut_dir}"]))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    cut = _results(cut_dir)
    assert cut["status"] == "interrupted" and "SIGTERM" in cut["error"]
    assert len(cut["accuracy_matrix"]) < 2
    monkeypatch.setattr(InTaskCheckpoints, "__call__", _ORIGINAL_CALL)

    run_main(compose([*common, f"paths.output_dir={cut_dir}", "resume.path=true"]))
    resumed = _results(cut_dir)
    assert resumed["status"] == "completed" and "error" not in resumed
    for key in MATRIX_KEYS:
        assert resumed[key] == full[key], key
    csvs = sorted(p.name for p in full_dir.glob("accuracy_matrix*.csv"))
    for name in csvs:  # extra evaluation variants (iCaRL's plain head) too
        assert (cut_dir / name).read_text() == (full_dir / name).read_text(), name


def test_checkpoints_hold_everything_and_load_weights_only(compose, tmp_path):
    out = tmp_path / "run"
    cfg = compose(["debug=fast", "method=er", f"paths.output_dir={out}",
                   "checkpoint.every_n_steps=3"])
    run_main(cfg)
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["format"] == checkpoint.FORMAT_VERSION and state["tasks_done"] == 2
    assert state["results"]["accuracy_matrix"] == _results(out)["accuracy_matrix"]
    assert state["config"]["method"]["lr"] == cfg.method.lr
    assert state["config_hash"] == checkpoint.config_hash(state["config"])
    assert {"memory.x", "memory.age", "task_counter"} <= set(state["method_state"])
    assert int(state["method_state"]["memory.age"]) == 80  # every streamed sample offered
    assert len(state["optimizer_states"]) == 1 and state["step"] == 8
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"}
    # the in-task checkpoint of a finished task is removed
    assert not (out / "checkpoints" / checkpoint.STEP_FILE).exists()
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_rng_state_round_trip():
    import numpy as np

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ------------------------------------------------------------------------------ refusals
def test_resume_with_a_different_config_names_the_keys(compose, tmp_path):
    out = tmp_path / "run"
    run_main(compose(["debug=fast", "method=er", f"paths.output_dir={out}"]))
    before = (out / "results.json").read_text()
    with pytest.raises(ConfigError) as refused:
        run_main(compose(["debug=fast", "method=er", "method.lr=0.5", "seed=3",
                          f"paths.output_dir={out}", "resume.path=true"]))
    message = str(refused.value)
    assert "method.lr (0.1 -> 0.5)" in message and "seed (0 -> 3)" in message
    assert "resume.force=true" in message
    assert (out / "results.json").read_text() == before  # untouched
    # keys that may change (logger, checkpoint frequency, data_dir) are not a difference
    value = run_main(compose(["debug=fast", "method=er", f"paths.output_dir={out}",
                              "resume.path=true", "logger=csv", "checkpoint.every_n_steps=0",
                              "data_dir=/elsewhere"]))
    assert value == _results(out)["metrics"]["RA"]  # finished: reported, nothing retrained
    assert (out / "results.json").read_text() == before


def test_forced_resume_continues_under_the_new_config(compose, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _stop_at(monkeypatch, 5)
    with pytest.raises(Interrupted):
        run_main(compose(["debug=fast", "method=er", f"paths.output_dir={out}"]))
    monkeypatch.setattr(InTaskCheckpoints, "__call__", _ORIGINAL_CALL)
    run_main(compose(["debug=fast", "method=er", "method.lr=0.05", f"paths.output_dir={out}",
                      "resume.path=true", "resume.force=true"]))
    results = _results(out)
    assert results["status"] == "completed" and results["config"]["method"]["lr"] == 0.05


def test_resume_without_a_checkpoint_is_refused_before_loading(compose, tmp_path, monkeypatch):
    from metacl.data.datamodule import ContinualDataModule

    monkeypatch.setattr(ContinualDataModule, "build",
                        lambda self: pytest.fail("data loaded before the resume check"))
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        run_main(compose(["debug=fast", f"paths.output_dir={tmp_path / 'empty'}",
                          "resume.path=true"]))
    assert not (tmp_path / "empty").exists()


def test_a_truncated_checkpoint_is_refused_with_a_message(compose, tmp_path):
    out = tmp_path / "run"
    run_main(compose(["debug=fast", "method=finetune", f"paths.output_dir={out}"]))
    ckpt = out / "checkpoints" / checkpoint.BOUNDARY_FILE
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot be read"):
        run_main(compose(["debug=fast", "method=finetune", f"paths.output_dir={out}",
                          "resume.path=true"]))


def test_resume_alias_and_latest_run_lookup(tmp_path):
    from metacl.resolvers import expand_aliases, run_dir

    assert expand_aliases(["resume=true", "resume.force=true", "+resume=x", "seed=1"]) == [
        "resume.path=true", "resume.force=true", "+resume.path=x", "seed=1"]
    runs = tmp_path / "runs"
    for name, overrides, ckpt in (("2026-01-01", ["method=er"], True),
                                  ("2026-01-02", ["method=er"], True),
                                  ("2026-01-03", ["method=er"], False),  # no checkpoint
                                  ("2026-01-04", ["method=finetune"], True)):
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / ".hydra" / "overrides.yaml").write_text(
            "\n".join(f"- {o}" for o in [*overrides, "resume.path=true"]))
        if ckpt:
            (runs / name / "checkpoints").mkdir()
            (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
    new = str(runs / "new")
    assert run_dir(True, new, str(runs), ["method=er", "resume.path=true"]) == str(
        runs / "2026-01-02")
    assert run_dir(True, new, str(runs), ["method=lamaml"]) == new
    assert run_dir(None, new, str(runs), ["method=er"]) == new
    assert run_dir("/some/run", new, str(runs), []) == "/some/run"


# ------------------------------------------------------------------------------ divergence
def test_divergence_stops_with_task_and_step_and_status_diverged(compose, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergedError, match=r"in task 0 \(batch \d+\)"):
        run_main(compose(["debug=fast", "method=er", "method.lr=1e30",
                          f"paths.output_dir={out}", "checkpoint.every_n_steps=2"]))
    results = _results(out)
    assert results["status"] == "diverged" and "DivergedError" in results["error"]
    assert results["accuracy_before"] is not None  # what it had is saved
    # the checkpoint is the last finite state (before the first task), never a NaN one
    state = checkpoint.load(out / "checkpoints" / checkpoint.BOUNDARY_FILE)
    assert state["tasks_done"] == 0
    assert all(torch.isfinite(v).all() for v in state["method_state"].values()
               if v.is_floating_point())
    assert not (out / "checkpoints" / checkpoint.STEP_FILE).exists()


# ------------------------------------------------------------------------------ few-shot
@pytest.mark.parametrize("method", EPISODIC)
def test_few_shot_method_state_round_trips_through_a_weights_only_file(compose, tmp_path,
                                                                        method):
    cfg = compose(["debug=fast", "dataset=digits_fewshot", "model=conv4", f"method={method}"])
    info = instantiate(cfg.dataset).build().episode_info

    def build(seed):
        torch.manual_seed(seed)
        backbone = instantiate(cfg.model, input_shape=info.input_shape,
                               n_outputs=info.n_outputs)
        return instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)

    trained, fresh = build(0), build(1)
    for tensor in trained.state_dict().values():  # stands for meta-training's updates
        if tensor.is_floating_point():
            tensor.add_(torch.randn_like(tensor))
    path = tmp_path / "state.ckpt"
    checkpoint.atomic_save({"method_state": trained.state_dict()}, path)
    fresh.load_state_dict(torch.load(path, weights_only=True)["method_state"])
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    x = torch.rand(2, *info.input_shape)
    trained.eval(), fresh.eval()
    assert torch.equal(trained.backbone(x), fresh.backbone(x))


_ORIGINAL_ON_BATCH = EpisodicCheckpoints.on_batch


def _stop_episodic_at(monkeypatch, at_step: int, signum=signal.SIGTERM):
    """Deliver a real signal to this process after meta-batch `at_step`."""
    original = EpisodicCheckpoints.on_batch

    def on_batch(self, stream, trainer, pl_module, batch_idx):
        if stream.step == at_step:
            os.kill(os.getpid(), signum)
        return original(self, stream, trainer, pl_module, batch_idx)

    monkeypatch.setattr(EpisodicCheckpoints, "on_batch", on_batch)


FEW_SHOT_KEYS = ("test_acc_per_step", "test_loss_per_step", "val_acc_per_epoch", "val_acc")


# 3 epochs of 3 meta-batches: stopped inside epoch 1 (step 5), or on its last meta-batch
# (step 6: the checkpoint waits for the epoch's validation), with and without periodic saves.
@pytest.mark.parametrize(("method", "at_step", "every"), [
    ("maml", 5, 0), ("maml", 6, 2), ("meta_sgd", 5, 1), ("protonet", 4, 0)])
def test_a_stopped_few_shot_run_resumes_to_the_same_results(compose, tmp_path, monkeypatch,
                                                          method, at_step, every):
    """SIGTERM during meta-training, resume=true: the weights, the optimizer and LR-schedule
    states, the episode generator and the validation history come back, so the test and val
    results equal an uninterrupted run's exactly."""
    common = ["debug=fast", "dataset=digits_fewshot", "model=conv4", "model.channels=8",
              f"method={method}", "method.n_epochs=3", "dataset.limit_tasks=3",
              "dataset.val_episodes=6", "dataset.limit_test_per_task=10",
              "method.meta_batch_size=2", f"checkpoint.every_n_steps={every}"]
    if method != "protonet":
        common += ["method.inner_steps_test=3"]
    if method != "protonet":
        common += ["method.lr_step=4"]  # a StepLR whose state must come back too
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    run_main(compose([*common, f"paths.output_dir={full_dir}"]))
    full = _results(full_dir)

    _stop_episodic_at(monkeypatch, at_step)
    with pytest.raises(Interrupted):
        run_main(compose([*common, f"paths.output_dir={cut_dir}"]))
    cut = _results(cut_dir)
    assert cut["status"] == "interrupted" and "SIGTERM" in cut["error"]
    state = torch.load(cut_dir / "checkpoints" / checkpoint.BOUNDARY_FILE, weights_only=True)
    expected = {"epoch": 1, "batch": 2} if at_step == 5 else {"epoch": 2, "batch": 0}
    if at_step == 4:
        expected = {"epoch": 1, "batch": 1}
    assert state["position"] == expected and state["step"] == at_step
    assert len(state["validation"]["history"]) == expected["epoch"]
    monkeypatch.setattr(EpisodicCheckpoints, "on_batch", _ORIGINAL_ON_BATCH)

    run_main(compose([*common, f"paths.output_dir={cut_dir}", "resume.path=true"]))
    resumed = _results(cut_dir)
    assert resumed["status"] == "completed" and "error" not in resumed
    for key in FEW_SHOT_KEYS:
        assert resumed["metrics"][key] == full["metrics"][key], key
    # a finished run resumed again trains nothing and reports the stored metric
    assert run_main(compose([*common, f"paths.output_dir={cut_dir}", "resume.path=true"])
                    ) == full["metrics"]["test_acc"]


# ------------------------------------------------------------------------------ subprocesses
def _train_py(args, cwd, **popen):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _tasks_done(out: Path) -> int:
    try:
        return len(_results(out)["accuracy_matrix"])
    except (OSError, ValueError, KeyError):
        return 0


KILLED = {"finetune": signal.SIGKILL, "er": signal.SIGTERM, "lamaml": signal.SIGKILL}
TINY = ["debug=fast", "dataset.n_tasks=3", "dataset.limit_train_per_task=200",
        "checkpoint.every_n_steps=3", "method.glances=1"]


def _tiny(method: str) -> list[str]:
    return [*TINY, f"method={method}"]


def _wait_for(condition, proc, timeout=240.0) -> float:
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.monotonic()


def test_killed_subprocesses_resume_to_the_uninterrupted_matrix(compose, tmp_path):
    """Real train.py processes, killed (SIGKILL, or SIGTERM for ER) at a random point after
    their first task; one multirun resumes all three; the matrices equal uninterrupted runs."""
    rng = random.Random()
    outs = {m: tmp_path / "sweep" / m for m in KILLED}
    procs = {m: _train_py([*_tiny(m), f"hydra.run.dir={outs[m]}"], tmp_path) for m in KILLED}
    # meanwhile, the uninterrupted references in this process (same threads, same seeds)
    full = {}
    for m in KILLED:
        ref = tmp_path / "full" / m
        run_main(compose([*_tiny(m), f"paths.output_dir={ref}"]))
        full[m] = _results(ref)
    # Task 0 starts when results.json first appears and ends with its first row; tasks 1 and
    # 2 are as long, so a random delay below 0.6 x task 0 lands inside them. The three
    # processes run at once, so they are watched together.
    started: dict[str, float] = {}
    kill_at: dict[str, float] = {}
    pending = set(KILLED)
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline:
        now = time.monotonic()
        for m in sorted(pending):
            if procs[m].poll() is not None:
                pending.discard(m)  # finished or crashed: the asserts below say which
            elif m not in started:
                if (outs[m] / "results.json").exists():
                    started[m] = now
            elif m not in kill_at:
                if _tasks_done(outs[m]) >= 1:
                    kill_at[m] = now + rng.uniform(0.0, 0.6 * (now - started[m]))
            elif now >= kill_at[m]:
                procs[m].send_signal(KILLED[m])
                pending.discard(m)
        time.sleep(0.005)
    for m, proc in procs.items():
        _, err = proc.communicate(timeout=120)
    # one process resumes the three runs: their folders are the sweep's job folders
    # one process resumes the three runs, as the jobs of a sweep whose folders they are
    # (resume.auto: what a requeued SLURM job does)
    resume = _train_py(["-m", *TINY, "method=finetune,er,lamaml",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        "hydra.sweep.subdir=${hydra.runtime.choices.method}",
                        "resume.auto=true"], tmp_path)
    _, err = resume.communicate(timeout=300)
    assert resume.returncode == 0, err[-3000:]
    assert err.count("resuming") == 3, err[-3000:]
    for m in KILLED:
        resumed = _results(outs[m])
        assert resumed["status"] == "completed"
        for key in MATRIX_KEYS:
            assert resumed[key] == full[m][key], (m, key)


# ------------------------------------------------------------------------------ SLURM
def test_preemption_saves_hands_over_to_submitit_and_the_requeued_job_resumes(
        compose, tmp_path, monkeypatch):
    """submitit turns SIGUSR2 (pre-emption / time limit) into checkpoint-and-requeue: the run
    saves first, then lets submitit's handler requeue and exit; the requeued job (same
    overrides, same folder, SUBMITIT_EXECUTOR set) resumes on its own (resume.auto: null)."""
    common = ["debug=fast", "method=er", "checkpoint.every_n_steps=0"]
    run_main(compose([*common, f"paths.output_dir={tmp_path / 'full'}"]))
    out = tmp_path / "job"
    requeued = []

    def submitit_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue ends in
        requeued.append((signum, (out / "checkpoints" / checkpoint.STEP_FILE).exists()))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        _stop_at(monkeypatch, 6, signal.SIGUSR2)
        with pytest.raises(SystemExit):
            run_main(compose([*common, f"paths.output_dir={out}"]))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert requeued == [(signal.SIGUSR2, True)]  # saved before submitit took over
    assert _results(out)["status"] == "interrupted"
    monkeypatch.setattr(InTaskCheckpoints, "__call__", _ORIGINAL_CALL)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # set by submitit in every job
    run_main(compose([*common, f"paths.output_dir={out}"]))
    full, resumed = _results(tmp_path / "full"), _results(out)
    assert resumed["status"] == "completed"
    for key in MATRIX_KEYS:
        assert resumed[key] == full[key], key


def test_submitit_launcher_requeues_the_same_job():
    """hydra-submitit-launcher's checkpoint() (called by submitit on pre-emption) resubmits the
    launcher itself with the job's own arguments: same overrides, same job folder."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    launcher = BaseSubmititLauncher(partition="gpu")
    args = (["method=er", "seed=1"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    delayed = launcher.checkpoint(*args)
    assert delayed.function is launcher and delayed.args == args
