"""HAT's benchmarks: hat_cifar (CIFAR-10 + CIFAR-100 files), pmnist / mnist2 (+ bundled digits)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from metacl.data.scenarios import hat_cifar
from metacl.data.sources import load_bundled, load_cifar10_100
from metacl.errors import ConfigError
from metacl.runner.main import main as run_main

from .fixtures import write_cifar


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, n_classes=10, train_per_class=20, test_per_class=4)
    write_cifar(root, n_classes=100, train_per_class=20, test_per_class=2, seed=1)
    return root


def test_cifar10_100_source_stacks_both_label_sets(cifar_dir):
    split = load_cifar10_100(data_dir=cifar_dir, verify_md5=False)
    assert split.n_classes == 110 and split.x_train.shape == (200 + 2000, 3, 32, 32)
    assert torch.equal(torch.bincount(split.y_train), torch.full((110,), 20))
    assert split.y_test[:40].max() < 10 and split.y_test[40:].min() >= 10


def test_hat_cifar_tasks_follow_the_reference_order_and_sizes(cifar_dir):
    split = load_cifar10_100(data_dir=cifar_dir, verify_md5=False)
    tasks = hat_cifar(split, seed=0, validation=0.15)
    order = np.random.RandomState(0).permutation(10)  # the reference's sklearn shuffle
    assert order.tolist() == [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    start = 0
    for task, group in zip(tasks, order):
        originals = [2 * group, 2 * group + 1] if group < 5 else list(
            range(10 + 20 * (group - 5), 30 + 20 * (group - 5)))
        assert task.param == originals
        assert task.classes == list(range(start, start + len(originals)))
        start += len(originals)
        # 15% of every class's 20 training images (3) held out, the rest for training
        assert torch.equal(torch.bincount(task.y_val - task.classes[0]),
                           torch.full((len(originals),), 3))
        assert len(task.y_train) == 17 * len(originals)
        assert set(task.y_test.tolist()) == set(task.classes)
        # the images are the source's images of those classes
        first = split.x_test[split.y_test == originals[0]]
        assert torch.equal(task.x_test[task.y_test == task.classes[0]], first)
    assert [t.param for t in hat_cifar(split, seed=1)] != [t.param for t in tasks]  # seeded order
    with pytest.raises(ConfigError, match="needs the cifar10_100 source"):
        hat_cifar(load_bundled())


def test_pmnist_gives_each_task_its_own_head(compose):
    cfg = compose(["dataset=pmnist_bundled"])
    assert cfg.dataset.validation == 0.15 and not cfg.dataset.augment
    dm = instantiate(cfg.dataset).build()
    info = dm.task_info
    assert info.n_tasks == 10 and info.n_outputs == 100 and info.multi_head
    base = load_bundled()
    for t, task in enumerate(dm.tasks):
        assert task.classes == list(range(10 * t, 10 * t + 10))
        for y in (task.y_train, task.y_val, task.y_test):
            assert y.min() == 10 * t and y.max() == 10 * t + 9
        assert len(task.y_train) + len(task.y_val) == len(base.y_train)  # every digit
        assert len(task.y_val) == 600
        perm = task.param
        assert torch.equal(task.x_test.flatten(1), base.x_test.flatten(1)[:, perm])
        assert torch.equal(task.y_test - 10 * t, base.y_test)


def test_mnist2_is_digits_0_to_4_then_5_to_9(compose):
    dm = instantiate(compose(["dataset=mnist2_bundled"]).dataset).build()
    assert [t.param for t in dm.tasks] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert dm.task_info.multi_head and len(dm.tasks[0].y_val) == 300


def test_full_mnist_configs_read_the_raw_files(compose):
    for name in ("pmnist", "mnist2"):
        cfg = compose([f"dataset={name}", "data_dir=/nonexistent"])
        assert cfg.dataset.source._target_ == "metacl.data.sources.load_mnist"
        with pytest.raises(Exception, match="MNIST not found"):
            instantiate(cfg.dataset).build()


def test_hat_with_alexnet_and_its_schedule_on_hat_cifar_end_to_end(compose, tmp_path, cifar_dir):
    out = tmp_path / "out"
    cfg = compose(["debug=fast", f"paths.output_dir={out}", "method=hat", "model=alexnet",
                   "dataset=hat_cifar", f"data_dir={cifar_dir}", "schedule=hat",
                   "dataset.source.verify_md5=false", "dataset.limit_train_per_task=null",
                   "dataset.limit_test_per_task=null", "method.n_epochs=2",
                   "method.batch_size=32", "model.channels=[8,16,32]", "model.hidden=64"])
    run_main(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert len(results["accuracy_matrix"]) == 2 and results["accuracy_matrix_agnostic"]
    assert len(results["validation"]["accuracy_matrix"]) == 2
    usage = results["method_metrics"]
    assert set(usage[0]) == {*(f"hat/used_layer{i}" for i in range(5)), "hat/used_all"}
    # the cumulative mask only grows
    assert all(usage[1][k] >= usage[0][k] for k in usage[0])
