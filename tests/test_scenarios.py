"""Continual-learning scenarios built from small in-memory splits."""

from __future__ import annotations

import pytest
import torch

from metacl.data.scenarios import (
    class_split,
    from_mer,
    mnist_many_permutations,
    mnist_permutations,
    mnist_rotations,
    rotate_images,
)
from metacl.data.sources import ImageSplit, MerTasks, load_bundled
from metacl.errors import ConfigError


@pytest.fixture(scope="module")
def digits() -> ImageSplit:
    return load_bundled()


def _tagged_split(n_classes: int = 20, train_per_class: int = 10, test_per_class: int = 3):
    """Images whose pixels record their original label and sample index, to trace remapping."""

    def make(per_class: int, offset: int):
        y = torch.arange(n_classes).repeat_interleave(per_class)
        y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(offset))]
        x = torch.zeros(len(y), 3, 4, 4, dtype=torch.uint8)
        x[:, 0, 0, 0] = y.to(torch.uint8)
        index = torch.arange(len(y)) + offset
        x[:, 0, 0, 1] = (index % 256).to(torch.uint8)
        x[:, 0, 0, 2] = (index // 256).to(torch.uint8)
        return x, y

    x_train, y_train = make(train_per_class, 0)
    x_test, y_test = make(test_per_class, 10_000)
    return ImageSplit(x_train, y_train, x_test, y_test, n_classes=n_classes)


def _ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 1].long() + 256 * x[:, 0, 0, 2].long()).tolist())


def _original_labels(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0].long()


# ------------------------------------------------------------------------------------------
# Rotations
# ------------------------------------------------------------------------------------------


def test_rotation_angles_fall_in_their_own_intervals(digits):
    tasks = mnist_rotations(digits, n_tasks=6, samples_per_task=50, seed=3)
    angles = [t.param for t in tasks]
    for t, angle in enumerate(angles):
        assert 30 * t <= angle < 30 * (t + 1)
    assert angles == sorted(angles) and len(set(angles)) == 6


def test_rotation_tasks_hold_rotated_training_digits(digits):
    tasks = mnist_rotations(digits, n_tasks=3, samples_per_task=100, seed=0)
    drawn = []
    for task in tasks:
        assert task.x_train.shape == (100, 1, 28, 28) and task.x_train.dtype == torch.uint8
        assert task.x_test.shape == digits.x_test.shape
        assert torch.equal(task.y_test, digits.y_test)
        assert task.classes == list(range(10))
        # Every training image is the rotation of a distinct original with the same label.
        rotated = rotate_images(digits.x_train, task.param)
        where = {bytes(row.numpy()): i for i, row in enumerate(rotated.flatten(1))}
        idx = [where[bytes(row.numpy())] for row in task.x_train.flatten(1)]
        assert len(set(idx)) == 100
        assert torch.equal(digits.y_train[idx], task.y_train)
        assert torch.equal(task.x_test, rotate_images(digits.x_test, task.param))
        drawn.append(set(idx))
    # A fresh draw per task, not the same 100 digits every time.
    assert drawn[0] != drawn[1] and drawn[1] != drawn[2]


def test_rotation_changes_images(digits):
    tasks = mnist_rotations(digits, n_tasks=4, samples_per_task=10, seed=1)
    for task in tasks[1:]:  # angles >= 45 degrees move most stroke pixels
        changed = (task.x_test != digits.x_test).float().mean()
        assert changed > 0.05
        # Rotation keeps ink roughly in place overall (no blank or inverted images).
        ratio = task.x_test.float().mean() / digits.x_test.float().mean()
        assert 0.8 < ratio < 1.1


def test_zero_and_tiny_rotation_are_identity(digits):
    x = digits.x_test[:50]
    assert torch.equal(rotate_images(x, 0.0), x)
    # A tiny angle takes the interpolating path; bilinear rounding may move values by 1.
    assert (rotate_images(x, 1e-4).int() - x.int()).abs().max() <= 1
    assert not torch.equal(rotate_images(x, 30.0), x)


def test_rotations_are_seeded(digits):
    a = mnist_rotations(digits, n_tasks=3, samples_per_task=20, seed=5)
    b = mnist_rotations(digits, n_tasks=3, samples_per_task=20, seed=5)
    c = mnist_rotations(digits, n_tasks=3, samples_per_task=20, seed=6)
    assert [t.param for t in a] == [t.param for t in b]
    assert all(torch.equal(s.x_train, t.x_train) for s, t in zip(a, b, strict=True))
    assert [t.param for t in a] != [t.param for t in c]
    # The global RNG is neither used nor disturbed.
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    mnist_rotations(digits, n_tasks=2, samples_per_task=20, seed=5)
    assert torch.equal(torch.rand(3), before)


def test_rotations_reject_bad_sizes(digits):
    with pytest.raises(ConfigError, match="samples_per_task=5000"):
        mnist_rotations(digits, n_tasks=2, samples_per_task=5000)
    with pytest.raises(ConfigError, match="n_tasks=0"):
        mnist_rotations(digits, n_tasks=0)


# ------------------------------------------------------------------------------------------
# Permutations
# ------------------------------------------------------------------------------------------


def test_permutations_distinct_and_applied(digits):
    tasks = mnist_permutations(digits, n_tasks=4, samples_per_task=30, seed=0)
    perms = [t.param for t in tasks]
    for perm in perms:
        assert perm.dtype == torch.int64
        assert torch.equal(perm.sort().values, torch.arange(784))
    assert len({tuple(p.tolist()) for p in perms}) == 4
    for task in tasks:
        expected = digits.x_test.flatten(1)[:, task.param].view(-1, 1, 28, 28)
        assert torch.equal(task.x_test, expected)
        assert task.x_train.shape == (30, 1, 28, 28)
        # Permuting pixels keeps each image's pixel multiset.
        assert torch.equal(
            task.x_test.flatten(1).sort(dim=1).values, digits.x_test.flatten(1).sort(dim=1).values
        )


def test_permutations_seeded(digits):
    a = mnist_permutations(digits, n_tasks=3, samples_per_task=10, seed=1)
    b = mnist_permutations(digits, n_tasks=3, samples_per_task=10, seed=1)
    c = mnist_permutations(digits, n_tasks=3, samples_per_task=10, seed=2)
    assert all(torch.equal(s.param, t.param) for s, t in zip(a, b, strict=True))
    assert all(torch.equal(s.x_train, t.x_train) for s, t in zip(a, b, strict=True))
    assert not any(torch.equal(s.param, t.param) for s, t in zip(a, c, strict=True))


def test_many_permutations_defaults():
    split = _tagged_split(n_classes=10, train_per_class=25, test_per_class=1)
    tasks = mnist_many_permutations(split)
    assert len(tasks) == 100
    assert all(len(t.y_train) == 200 for t in tasks)
    assert len({tuple(t.param.tolist()) for t in tasks}) == 100


# ------------------------------------------------------------------------------------------
# Class splits
# ------------------------------------------------------------------------------------------


def test_class_split_disjoint_covering_contiguous():
    split = _tagged_split()
    tasks = class_split(split, n_tasks=4, seed=0)
    originals = [c for t in tasks for c in t.param]
    assert sorted(originals) == list(range(20))
    for t, task in enumerate(tasks):
        assert task.classes == list(range(5 * t, 5 * t + 5))
        assert sorted(task.y_train.unique().tolist()) == task.classes
        assert sorted(task.y_test.unique().tolist()) == task.classes
        assert len(task.y_train) == 50 and len(task.y_test) == 15
        # New label = position of the original class in the order.
        assert torch.equal(_original_labels(task.x_train), torch.tensor(originals)[task.y_train])
        assert torch.equal(_original_labels(task.x_test), torch.tensor(originals)[task.y_test])
        assert task.x_val is None and task.y_val is None
    assert sum(len(t.y_train) for t in tasks) == len(split.y_train)


def test_class_order_seeded_fixed_and_explicit():
    split = _tagged_split()

    def order(**kwargs):
        return [c for t in class_split(split, n_tasks=4, **kwargs) for c in t.param]

    assert order(seed=0) == order(seed=0)
    assert order(seed=0) != order(seed=1)
    assert order(seed=0) != list(range(20))
    assert order(class_order="fixed", seed=7) == list(range(20))
    explicit = list(range(19, -1, -1))
    assert order(class_order=explicit) == explicit


def test_class_split_subset_of_classes():
    split = _tagged_split()
    tasks = class_split(split, n_tasks=3, classes_per_task=2, class_order="fixed")
    assert [t.param for t in tasks] == [[0, 1], [2, 3], [4, 5]]
    assert sum(len(t.y_train) for t in tasks) == 60


def test_init_and_increment_sizes():
    split = _tagged_split()
    tasks = class_split(split, n_tasks=4, init_cls_num=8, inc_cls_num=4, seed=2)
    assert [len(t.classes) for t in tasks] == [8, 4, 4, 4]
    assert tasks[1].classes == [8, 9, 10, 11]
    assert [len(t.y_train) for t in tasks] == [80, 40, 40, 40]
    # Without inc_cls_num the remaining classes are spread evenly.
    tasks = class_split(split, n_tasks=3, init_cls_num=10)
    assert [len(t.classes) for t in tasks] == [10, 5, 5]


def test_validation_fraction_exact_per_class():
    split = _tagged_split(train_per_class=20)
    tasks = class_split(split, n_tasks=4, validation=0.1, seed=0)
    for task in tasks:
        assert torch.bincount(task.y_val)[task.classes].tolist() == [2] * 5
        assert torch.bincount(task.y_train)[task.classes].tolist() == [18] * 5
        assert not _ids(task.x_val) & _ids(task.x_train)
        assert torch.equal(
            _original_labels(task.x_val), torch.tensor(task.param)[task.y_val - task.classes[0]]
        )
    again = class_split(split, n_tasks=4, validation=0.1, seed=0)
    assert all(_ids(a.x_val) == _ids(b.x_val) for a, b in zip(tasks, again, strict=True))
    # 450/50 per class, as La-MAML uses for CIFAR.
    big = _tagged_split(n_classes=2, train_per_class=500, test_per_class=1)
    (task,) = class_split(big, n_tasks=1, validation=0.1)
    assert torch.bincount(task.y_val).tolist() == [50, 50]
    assert torch.bincount(task.y_train).tolist() == [450, 450]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tasks": 3}, "n_tasks=3"),
        ({"n_tasks": 4, "classes_per_task": 6}, "needs 24 classes"),
        ({"n_tasks": 4, "init_cls_num": 10, "inc_cls_num": 5}, "needs 25 classes"),
        ({"n_tasks": 2, "classes_per_task": 5, "init_cls_num": 5}, "classes_per_task=5"),
        ({"n_tasks": 0}, "n_tasks=0"),
        ({"n_tasks": 2, "class_order": "banana"}, "class_order='banana'"),
        ({"n_tasks": 1, "classes_per_task": 2, "class_order": [0, 25]}, r"\[25\]"),
        ({"n_tasks": 1, "classes_per_task": 2, "class_order": [3, 3]}, r"repeats classes \[3\]"),
        ({"n_tasks": 1, "classes_per_task": 2, "class_order": [0.5, 1]}, "class_order="),
        ({"n_tasks": 4, "validation": 1.0}, "validation=1.0"),
    ],
)
def test_class_split_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        class_split(_tagged_split(), **kwargs)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# MER files and the registry
# ------------------------------------------------------------------------------------------


def _mer(n_tasks: int = 3) -> MerTasks:
    gen = torch.Generator().manual_seed(0)
    train = [
        (torch.rand(12, 1, 28, 28, generator=gen), torch.arange(12) % 10) for _ in range(n_tasks)
    ]
    test = [(torch.rand(4, 1, 28, 28, generator=gen), torch.arange(4)) for _ in range(n_tasks)]
    return MerTasks(train=train, test=test, params=[float(t) for t in range(n_tasks)])


def test_from_mer_keeps_leading_samples_and_tasks():
    mer = _mer()
    tasks = from_mer(mer, n_tasks=2, samples_per_task=5)
    assert len(tasks) == 2
    assert torch.equal(tasks[1].x_train, mer.train[1][0][:5])
    assert torch.equal(tasks[1].y_train, mer.train[1][1][:5])
    assert torch.equal(tasks[0].x_test, mer.test[0][0])
    assert [t.param for t in tasks] == [0.0, 1.0]
    assert tasks[0].classes == list(range(10))
    assert len(from_mer(mer)) == 3
    with pytest.raises(ConfigError, match="n_tasks=4"):
        from_mer(mer, n_tasks=4)
    with pytest.raises(ConfigError, match="samples_per_task=13"):
        from_mer(mer, samples_per_task=13)


def test_dataset_configs_name_their_scenario_builders(compose):
    """Every continual dataset config's scenario node is a partial of a builder here; the one
    of cifar10 cuts the same tasks as calling class_split with its keys."""
    from hydra.utils import instantiate

    from .conftest import CONF

    for path in sorted((CONF / "dataset").glob("*.yaml")):
        cfg = compose([f"dataset={path.stem}"])
        if cfg.dataset._target_.endswith("ContinualDataModule"):
            builder = instantiate(cfg.dataset.scenario)
            assert builder.func.__module__ == "metacl.data.scenarios", path.stem
    split = _tagged_split(n_classes=10)
    cfg = compose(["dataset=cifar10", "dataset.scenario.class_order=fixed", "seed=3"])
    tasks = instantiate(cfg.dataset.scenario)(split)
    direct = class_split(split, n_tasks=5, classes_per_task=2, class_order="fixed",
                         validation=0.1, seed=3)
    assert [t.param for t in tasks] == [t.param for t in direct] == [[0, 1], [2, 3], [4, 5],
                                                                    [6, 7], [8, 9]]
    assert all(torch.equal(a.x_val, b.x_val) for a, b in zip(tasks, direct))
