"""The runner's ownership rules: the Session puts the method back on the run's device after
every Lightning call; the device comes from Lightning's strategy; the Evaluator follows the
model's device; RunRecord round-trips results.json."""

from __future__ import annotations

import json
from itertools import chain

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from metacl.runner.evaluator import Evaluator
from metacl.runner.main import main as run_main
from metacl.runner.record import RunRecord
from metacl.runner.session import Session


def _tensors(module: nn.Module):
    return chain(module.named_parameters(), module.named_buffers())


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    if t.dtype == torch.bool:
        return ~t
    return torch.full_like(t, torch.iinfo(t.dtype).max)


def _simulate_gpu_teardown(monkeypatch) -> list:
    """Lightning's teardown as it behaves on a GPU, simulated on the CPU: the module leaves
    the run's device when a fit ends. Its tensors' storage is swapped for garbage (NaN, huge
    indices) that only a later `module.to(...)` swaps back, keeping the Parameter objects, as
    CPU<->CUDA moves do. Code that uses the module before putting it back fails or computes
    garbage (NaN weights: the runner's divergence check stops the run)."""
    strategy = pl.strategies.SingleDeviceStrategy
    original = strategy.teardown
    moved = []

    def teardown(self):
        module = self.lightning_module
        original(self)
        tensors = dict(_tensors(module))
        stash = {name: (id(t), t.data) for name, t in tensors.items()}
        for t in tensors.values():
            t.data = _poisoned(t.data)

        def back(*args, **kwargs):
            del module.to  # the class's own `to` from now on
            for name, t in _tensors(module):
                object_id, data = stash[name]
                assert id(t) == object_id, "Parameter objects must survive the move"
                t.data = data
            moved.append(type(module).__name__)
            return module.to(*args, **kwargs)

        module.to = back

    monkeypatch.setattr(strategy, "teardown", teardown)
    return moved


@pytest.fixture
def teardown_moves_away(monkeypatch):
    return _simulate_gpu_teardown(monkeypatch)


def test_simulated_teardown_breaks_code_that_forgets_the_device(teardown_moves_away, compose):
    """The simulation is faithful enough to catch the bug: a fit, then evaluation without
    putting the module back, sees garbage weights; after `to` it sees the trained ones."""
    from hydra.utils import instantiate

    cfg = compose(["debug=fast", "method=er"])
    dm = instantiate(cfg.dataset).build()
    method = instantiate(cfg.method, _partial_=True)(
        backbone=instantiate(cfg.model, input_shape=dm.task_info.input_shape,
                             n_outputs=dm.task_info.n_outputs), task_info=dm.task_info)
    dm.batch_size = method.batch_size
    dm.set_task(0, [0])
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False).fit(method, datamodule=dm)
    assert all(torch.isnan(p).all() for p in method.parameters())
    params = list(method.parameters())
    method.to("cpu")
    assert teardown_moves_away == ["ER"]
    assert all(a is b for a, b in zip(params, method.parameters()))
    assert all(torch.isfinite(p).all() for p in method.parameters())


@pytest.mark.parametrize("overrides", [
    ["method=er"],
    ["method=lamaml"],
    ["method=icarl", "dataset=mnist2_bundled"],
    ["method=hat", "dataset=mnist2_bundled", "schedule=hat", "trainer.max_epochs=2"],
    ["dataset=digits_fewshot", "method=maml", "model=conv4", "model.channels=8",
     "dataset.meta_batches_per_epoch=3", "dataset.test_episodes=8", "dataset.val_episodes=4"],
], ids=["er", "lamaml", "icarl-split", "hat-schedule", "maml-fewshot"])
def test_runner_puts_the_method_back_after_every_fit(monkeypatch, compose, tmp_path,
                                                     overrides):
    """With the teardown simulated, runs complete with the results of a run without it."""
    base = ["debug=fast", "save_checkpoints=false", *overrides]
    plain, moved_away = tmp_path / "plain", tmp_path / "moved_away"
    run_main(compose([*base, f"paths.output_dir={plain}"]))
    moved = _simulate_gpu_teardown(monkeypatch)
    run_main(compose([*base, f"paths.output_dir={moved_away}"]))
    assert moved  # the simulation took place, and the runner brought the method back
    a = json.loads((plain / "results.json").read_text())
    b = json.loads((moved_away / "results.json").read_text())
    assert b["status"] == "completed"
    assert (a["accuracy_matrix"], a["metrics"]) == (b["accuracy_matrix"], b["metrics"])


def test_session_device_comes_from_the_strategy(compose, tmp_path):
    session = Session(compose(["debug=fast", f"paths.output_dir={tmp_path}"]), tmp_path)
    assert session.device == torch.device("cpu")
    trainer = session.trainer([])
    assert trainer.strategy.root_device == session.device
    assert not any(tmp_path.iterdir())  # a Session writes nothing until a loop starts


def test_auto_trains_a_small_mlp_on_the_cpu_even_where_a_gpu_is_visible(compose, tmp_path,
                                                                        monkeypatch, capsys):
    """trainer.accelerator=auto asks the backbone: La-MAML's 100-100 MLP is faster on the CPU
    (issue #20), so with CUDA visible the run still trains there, and says why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = compose(["debug=fast", "trainer.accelerator=auto", f"paths.output_dir={tmp_path}"])
    assert cfg.model.hidden == [100, 100]
    session = Session(cfg, tmp_path)
    assert session.device == torch.device("cpu")
    assert session.trainer([]).strategy.root_device == torch.device("cpu")
    assert cfg.trainer.accelerator == "auto"  # the job's config (results.json) is unchanged
    err = capsys.readouterr().err
    assert "MLP backbone trains faster on the CPU" in err and "trainer=gpu" in err


@pytest.mark.parametrize("overrides,cuda,moved", [
    ([], True, True),  # the default: La-MAML's 100-100 MLP
    (["experiment=maml/sinusoid_10shot"], True, True),  # 40-40
    ([], False, False),  # no GPU: nothing to choose
    (["trainer=gpu"], True, False),  # asked for the GPU: kept
    (["trainer.devices=[0]"], True, False),  # named GPU 0: kept
    (["model=mlp_hat"], True, False),  # HAT's 2000-2000 network keeps the GPU
    (["model=pc_cnn", "dataset=cifar100"], True, False),  # conv nets keep the GPU
])
def test_which_backbones_auto_moves_to_the_cpu(compose, overrides, cuda, moved):
    from metacl.runner.trainer import auto_device

    cfg = compose(overrides)
    chosen, note = auto_device(cfg.trainer, cfg.model, cuda_available=cuda)
    if moved:
        assert chosen.accelerator == "cpu" and note and "trainer=gpu" in note
        assert chosen.max_epochs == cfg.trainer.max_epochs  # the rest of the settings kept
    else:
        assert note is None and chosen is cfg.trainer


def test_evaluator_moves_batches_to_the_models_device(compose):
    """Every batch reaches `predict` on the model's device."""
    from hydra.utils import instantiate

    cfg = compose(["debug=fast", "method=finetune"])
    dm = instantiate(cfg.dataset).build()
    method = instantiate(cfg.method, _partial_=True)(
        backbone=instantiate(cfg.model, input_shape=dm.task_info.input_shape,
                             n_outputs=dm.task_info.n_outputs), task_info=dm.task_info)
    seen = []
    predict = method.predict

    def spy(x, t, **kwargs):
        seen.append(x.device)
        return predict(x, t, **kwargs)

    method.predict = spy
    aware, agnostic = Evaluator(dm).accuracy(method, 0)
    assert len(aware) == dm.task_info.n_tasks and agnostic is None
    assert seen and all(d == method.device for d in seen)


def test_run_record_round_trip(tmp_path):
    record = RunRecord.new(tmp_path, {"seed": 1}, stream=True, multi_head=True,
                           validation=True)
    record.matrix.append([0.5, 0.25])
    record.save()
    data = RunRecord.read(tmp_path)
    assert data["accuracy_matrix"] == [[0.5, 0.25]]
    assert data["accuracy_matrix_agnostic"] == [] and data["status"] == "running"
    assert data["validation"]["accuracy_matrix"] == []
    assert data["timing"]["total_seconds"] > 0
    record.mark_stopped(KeyboardInterrupt())
    record.save()
    assert RunRecord.read(tmp_path / "results.json")["status"] == "interrupted"
