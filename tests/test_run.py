"""End-to-end runs of the continual loop: every method on a tiny stream, outputs, CLI behaviour."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metacl.metrics import compute_metrics
from metacl.runner.main import main as run_main

from .conftest import CONF, ROOT


def _protocol(method_yaml):
    target = OmegaConf.load(method_yaml)._target_
    return getattr(get_class(target), "protocol", "continual")


# Every continual method config runs here; few-shot ones (protocol "episodic") in test_fewshot.
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if _protocol(p) == "continual")
RESULT_KEYS = {"config", "accuracy_matrix", "accuracy_matrix_agnostic", "accuracy_before",
               "metrics", "timing", "status"}
# Present only when they apply: the validation split's matrix, a method's task_metrics().
OPTIONAL_KEYS = {"validation", "method_metrics"}


def _run(compose, tmp_path, overrides):
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", *overrides])
    value = run_main(cfg)
    return cfg, value, json.loads((tmp_path / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(compose, tmp_path, method):
    cfg, value, results = _run(compose, tmp_path, [f"method={method}"])
    assert RESULT_KEYS <= set(results) <= RESULT_KEYS | OPTIONAL_KEYS
    assert results["status"] == "completed"
    R = results["accuracy_matrix"]
    assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert all(0.0 <= a <= 1.0 for row in R for a in row)
    assert results["accuracy_matrix_agnostic"] is None  # rotations: one shared head
    assert results["metrics"] == pytest.approx(compute_metrics(R, results["accuracy_before"]))
    assert value == results["metrics"]["RA"]
    assert results["config"]["method"]["_target_"] == cfg.method._target_
    if results["timing"]["train_seconds"] == 0:  # a method that trains nothing (random)
        assert all(row == results["accuracy_before"] for row in R)
    else:
        assert results["timing"]["train_seconds"] > 0
    if "method_metrics" in results:  # one dict of numbers per task
        assert len(results["method_metrics"]) == 2
        assert all(isinstance(v, float) for m in results["method_metrics"] for v in m.values())
    assert results["timing"]["total_seconds"] >= results["timing"]["train_seconds"]
    assert (tmp_path / "accuracy_matrix.csv").read_text().startswith("after_task,task_0,task_1")
    assert (tmp_path / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end_on_permutations(compose, tmp_path, monkeypatch, method):
    """The other bundled benchmark, as cheaply as possible: one incoming batch per task, and
    no heatmap (the PNG is checked above; drawing it costs more than this training)."""
    import metacl.runner.continual

    monkeypatch.setattr(metacl.runner.continual, "save_matrix_heatmap", lambda *args, **kwargs: None)
    _, value, results = _run(compose, tmp_path, [
        f"method={method}", "dataset=mnist_permutations", "dataset.limit_train_per_task=10"])
    assert results["status"] == "completed"
    assert results["config"]["dataset"]["scenario"]["_target_"].endswith(".mnist_permutations")
    R = results["accuracy_matrix"]
    assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert all(0.0 <= a <= 1.0 for row in R for a in row)
    assert results["metrics"] == pytest.approx(compute_metrics(R, results["accuracy_before"]))
    assert value == results["metrics"]["RA"]
    if results["timing"]["train_seconds"] == 0:  # a method that trains nothing (random)
        assert all(row == results["accuracy_before"] for row in R)
    else:
        assert results["timing"]["train_seconds"] > 0


def test_checkpoint_restores_the_method_exactly(compose, tmp_path):
    cfg, _, results = _run(compose, tmp_path, ["method=er"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["tasks_done"] == 2
    assert state["results"]["accuracy_matrix"] == results["accuracy_matrix"]
    dm = instantiate(cfg.dataset).build()
    info = dm.task_info
    fresh = instantiate(cfg.method, _partial_=True)(
        backbone=instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs),
        task_info=info,
    )
    before = [p.clone() for p in fresh.parameters()]
    fresh.load_state_dict(state["method_state"])
    assert any(not torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
    assert len(fresh.memory) == len(dm.tasks[0].y_train) + len(dm.tasks[1].y_train)
    # The restored method reproduces the stored last row exactly.
    from metacl.runner.evaluator import Evaluator

    aware, _ = Evaluator(dm).accuracy(fresh, 2)
    assert aware == results["accuracy_matrix"][-1]


def test_er_learns_rotated_digits_above_chance(compose, tmp_path):
    _, _, results = _run(compose, tmp_path, [
        "method=er", "dataset.limit_train_per_task=300", "dataset.limit_test_per_task=300"])
    assert results["metrics"]["RA"] > 0.5  # chance is 0.1
    assert results["metrics"]["LA"] > max(results["accuracy_before"])


def test_joint_trains_once_on_every_task(compose, tmp_path):
    _, _, results = _run(compose, tmp_path, ["method=joint"])
    first, last = results["accuracy_matrix"]
    assert first == last  # nothing is trained after the first task


def _train_py(args, cwd, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=False, cwd=cwd,
                          env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_single_run_and_two_job_multirun(tmp_path):
    single = _train_py(["debug=fast"], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    assert "RA" in single.stderr and "BTI" in single.stderr
    (run_dir,) = (tmp_path / "outputs" / "debug" / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"

    multi = _train_py(["-m", "debug=fast", "method=finetune,er"], tmp_path)
    assert multi.returncode == 0, multi.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "debug" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "results.json").exists())
    assert len(jobs) == 2
    targets = {json.loads((j / "results.json").read_text())["config"]["method"]["_target_"]
               for j in jobs}
    assert targets == {"metacl.methods.finetune.Finetune", "metacl.methods.er.ER"}


def test_cli_bad_value_is_one_clear_line(tmp_path):
    bad = _train_py(["debug=fast", "dataset.source=floppy"], tmp_path)
    assert bad.returncode != 0
    lines = [line for line in bad.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "floppy" in lines[-1] and "bundled" in lines[-1]
    assert "Traceback" not in bad.stderr


def test_help_lists_config_groups(tmp_path):
    out = _train_py(["--help"], tmp_path)
    assert out.returncode == 0
    for group in ("dataset", "model", "method", "trainer", "logger", "paths", "debug",
                  "experiment"):
        assert f"{group}:" in out.stdout or f"{group}/" in out.stdout, group


@pytest.mark.parametrize("method", ["finetune", "er"])
def test_class_split_run_reports_task_aware_and_agnostic(compose, tmp_path, method):
    from .fixtures import write_cifar

    data = write_cifar(tmp_path / "data", n_classes=10, train_per_class=30, test_per_class=10)
    out = tmp_path / "out"
    _, _, results = _run(compose, out, [
        f"method={method}", "dataset=cifar10", f"data_dir={data}", "model=mlp",
        "dataset.source.verify_md5=false", "dataset.limit_train_per_task=null",
        "dataset.limit_test_per_task=null", "dataset.limit_tasks=3", "dataset.augment=false",
        "method.n_epochs=3"])
    aware, agnostic = results["accuracy_matrix"], results["accuracy_matrix_agnostic"]
    assert len(aware) == len(agnostic) == 3
    # Masking to the task's 2 classes can only help: the agnostic argmax must also beat the
    # other seen classes.
    for row_aware, row_agnostic in zip(aware, agnostic):
        assert all(a >= g for a, g in zip(row_aware, row_agnostic))
    assert results["metrics"]["LA"] > 0.6  # 2-way tasks on separable patterns
    assert (out / "accuracy_matrix_agnostic.csv").exists()


def test_few_shot_method_on_a_continual_dataset_is_refused_before_loading(compose, tmp_path,
                                                                          monkeypatch):
    from metacl.data.datamodule import ContinualDataModule
    from metacl.errors import ConfigError

    def no_loading(self):
        raise AssertionError("data must not be loaded for a refused combination")

    monkeypatch.setattr(ContinualDataModule, "build", no_loading)
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", "method=maml"])
    with pytest.raises(ConfigError, match="MAML runs on episodic datasets"):
        run_main(cfg)


def test_threads_setting(monkeypatch):
    """threads: auto takes the backbone's CPU preference; numbers are applied; bad values refused."""
    from metacl.errors import ConfigError
    from metacl.models import MLP, PcCNN
    from metacl.runner.cpu import set_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    set_threads("auto", cpu, MLP((1, 2, 2), 3))
    set_threads("auto", cpu, PcCNN((3, 8, 8), 3, channels=2, n_conv=1, hidden=4))
    set_threads("auto", gpu, MLP((1, 2, 2), 3))
    set_threads(None, cpu, MLP((1, 2, 2), 3))
    set_threads(3, cpu, MLP((1, 2, 2), 3))
    from metacl.runner.cpu import DEFAULT_THREADS

    assert calls == [1, DEFAULT_THREADS, DEFAULT_THREADS, DEFAULT_THREADS, 3]
    for bad in (0, -2, "many", 1.5):
        with pytest.raises(ConfigError, match="threads="):
            set_threads(bad, cpu, MLP((1, 2, 2), 3))
