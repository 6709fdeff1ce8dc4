"""Every method declares the Lightning precisions it supports (`precisions`); those that declare
bf16-mixed really update under bf16 autocast (the runner refuses the undeclared ones)."""

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metacl.fewshot.base import MetaLearner
from metacl.methods.base import ContinualMethod

from .conftest import CONF

KNOWN = {"32-true", "bf16-mixed"}
CONFIGS = {p.stem: get_class(OmegaConf.load(p)._target_)
           for p in sorted((CONF / "method").glob("*.yaml"))}
CONTINUAL_BF16 = sorted(name for name, cls in CONFIGS.items()
                        if issubclass(cls, ContinualMethod) and "bf16-mixed" in cls.precisions)
EPISODIC_BF16 = sorted(name for name, cls in CONFIGS.items()
                       if issubclass(cls, MetaLearner) and "bf16-mixed" in cls.precisions)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_method_declares_its_precisions(name):
    cls = CONFIGS[name]
    assert issubclass(cls, ContinualMethod | MetaLearner)
    assert isinstance(cls.precisions, tuple) and "32-true" in cls.precisions
    assert set(cls.precisions) <= KNOWN, f"{name}: {cls.precisions}"


def test_bf16_is_declared_by_name_not_by_default():
    # The bases promise only full precision: a method adds bf16-mixed once it was checked.
    assert ContinualMethod.precisions == ("32-true",)
    assert MetaLearner.precisions == ("32-true",)


def _built(compose, name):
    cfg = compose(["debug=fast", f"method={name}"])
    dm = instantiate(cfg.dataset).build()
    info = dm.task_info
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, task_info=info)
    # observe() without a Trainer: the method's own optimizer, a plain backward.
    method.optimizers = lambda: method.optimizer
    method.manual_backward = lambda loss: loss.backward()
    return method, dm


@pytest.mark.parametrize("name", CONTINUAL_BF16)
def test_bf16_methods_observe_under_autocast(compose, name):
    """One observe per task, as bf16-mixed runs it (CPU autocast), on two tasks so that
    what only acts once a task is learned (projections, penalties, distillation) runs too."""
    torch.manual_seed(0)
    method, dm = _built(compose, name)
    for t in range(2):
        dm.set_task(t)
        method.before_task(t, dm)
        x, y, tt = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = method.observe(x, y, tt)
        assert torch.isfinite(loss).all(), name
        assert all(torch.isfinite(p).all() for p in method.parameters()), name
        assert all(p.dtype == torch.float32 for p in method.parameters())  # mixed: fp32 weights
        method.after_task(t, dm)


@pytest.mark.parametrize("name", EPISODIC_BF16)
def test_bf16_meta_learners_train_under_autocast(compose, tmp_path, name):
    from metacl.runner.main import main as run_main

    cfg = compose(["debug=fast", f"method={name}", "dataset=digits_fewshot",
                   "trainer.precision=bf16-mixed", f"paths.output_dir={tmp_path}",
                   "save_checkpoints=false"])
    run_main(cfg)
    results = OmegaConf.load(tmp_path / "results.json")
    assert results.status == "completed"
    assert 0.0 <= results.metrics.test_acc <= 1.0
