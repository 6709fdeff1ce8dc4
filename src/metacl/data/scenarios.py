"""Continual-learning scenarios: turn one ``ImageSplit`` into a sequence of ``Task``s.

A dataset config names its builder as a Hydra partial (``scenario: {_target_:
metacl.data.scenarios.class_split, _partial_: true, n_tasks: ..., ...}``); the datamodule calls
it with the loaded split. ``from_mer`` is no scenario to choose: the MER/La-MAML files hold
their tasks already, and the datamodule uses it whenever the source gives ``MerTasks``.

All builders are deterministic given ``seed``. They draw from local ``torch.Generator``s, never
the global RNG, so building a benchmark does not disturb (and is not disturbed by) model
initialisation or data-loader shuffling.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from metacl.data.sources import ImageSplit, MerTasks
from metacl.errors import ConfigError


@dataclass
class Task:
    """One task: its train/test (and optional validation) data, labels it uses, and its param."""

    x_train: torch.Tensor  # uint8 or float32 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[int]  # the (remapped) labels this task uses
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    param: object = None  # rotation angle in degrees, pixel permutation, or original class ids


# Independent random streams per purpose, so that e.g. a task's rotation angle does not change
# when only samples_per_task changes.
_STREAM_PARAMS = 0
_STREAM_SUBSETS = 1
_STREAM_CLASS_ORDER = 2
_STREAM_VALIDATION = 3


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is invalid; it must be a positive integer")


def _subset_size(samples_per_task: int | str | None, available: int) -> int:
    if samples_per_task is None or samples_per_task == "all":
        return available
    _check_positive("samples_per_task", samples_per_task)
    if samples_per_task > available:
        raise ConfigError(
            f"samples_per_task={samples_per_task} is larger than the {available} training "
            "samples available"
        )
    return samples_per_task


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate a whole (N, C, H, W) batch counter-clockwise by ``angle`` degrees (bilinear).

    Works on uint8 directly (torchvision interpolates in float and rounds back), so rotated
    MNIST keeps the memory footprint of the original bytes. Corners are filled with 0.
    """
    return TF.rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR)


def mnist_rotations(
    split: ImageSplit, n_tasks: int = 20, samples_per_task: int | None = 1000, seed: int = 0
) -> list[Task]:
    """Rotated MNIST: task t rotates all digits by one angle drawn in [180t/T, 180(t+1)/T).

    Each task trains on a fresh random draw of ``samples_per_task`` digits (without replacement)
    and is tested on the whole test split, rotated by the same angle.
    """
    _check_positive("n_tasks", n_tasks)
    size = _subset_size(samples_per_task, len(split.y_train))
    angle_gen = _generator(seed, _STREAM_PARAMS)
    subset_gen = _generator(seed, _STREAM_SUBSETS)
    classes = list(range(split.n_classes))
    tasks = []
    for t in range(n_tasks):
        u = torch.rand((), generator=angle_gen, dtype=torch.float64).item()
        angle = 180.0 * (t + u) / n_tasks
        idx = torch.randperm(len(split.y_train), generator=subset_gen)[:size]
        tasks.append(
            Task(
                x_train=rotate_images(split.x_train[idx], angle),
                y_train=split.y_train[idx].clone(),
                x_test=rotate_images(split.x_test, angle),
                y_test=split.y_test.clone(),
                classes=classes,
                param=angle,
            )
        )
    return tasks


def permute_pixels(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Apply one permutation of the H*W pixel positions (the same for every channel)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def mnist_permutations(
    split: ImageSplit, n_tasks: int = 20, samples_per_task: int | None = 1000, seed: int = 0
) -> list[Task]:
    """Permuted MNIST: each task shuffles the pixel positions with its own fixed permutation."""
    _check_positive("n_tasks", n_tasks)
    size = _subset_size(samples_per_task, len(split.y_train))
    perm_gen = _generator(seed, _STREAM_PARAMS)
    subset_gen = _generator(seed, _STREAM_SUBSETS)
    n_pixels = split.x_train.shape[-2] * split.x_train.shape[-1]
    classes = list(range(split.n_classes))
    seen: set[tuple[int, ...]] = set()
    tasks = []
    for _ in range(n_tasks):
        # A repeated permutation would silently make two tasks identical; redraw in that
        # (astronomically unlikely for 784 pixels, possible for toy images) case.
        perm = torch.randperm(n_pixels, generator=perm_gen)
        while tuple(perm.tolist()) in seen:
            perm = torch.randperm(n_pixels, generator=perm_gen)
        seen.add(tuple(perm.tolist()))
        idx = torch.randperm(len(split.y_train), generator=subset_gen)[:size]
        tasks.append(
            Task(
                x_train=permute_pixels(split.x_train[idx], perm),
                y_train=split.y_train[idx].clone(),
                x_test=permute_pixels(split.x_test, perm),
                y_test=split.y_test.clone(),
                classes=classes,
                param=perm,
            )
        )
    return tasks


def mnist_many_permutations(
    split: ImageSplit, n_tasks: int = 100, samples_per_task: int | None = 200, seed: int = 0
) -> list[Task]:
    """Many Permutations (MER): permuted MNIST with 100 tasks of 200 samples by default."""
    return mnist_permutations(split, n_tasks=n_tasks, samples_per_task=samples_per_task, seed=seed)


def _class_order(class_order: Any, n_classes: int, seed: int) -> list[int]:
    if isinstance(class_order, str):
        if class_order == "random":
            gen = _generator(seed, _STREAM_CLASS_ORDER)
            return torch.randperm(n_classes, generator=gen).tolist()
        if class_order == "fixed":
            return list(range(n_classes))
        raise ConfigError(
            f"class_order='{class_order}' is invalid; allowed: 'random', 'fixed' or a list of "
            "class ids"
        )
    try:
        # operator.index accepts Python and numpy ints (and OmegaConf list items) but not floats.
        order = [operator.index(c) for c in class_order]
    except TypeError as exc:
        raise ConfigError(
            f"class_order={class_order!r} is invalid; allowed: 'random', 'fixed' or a list of "
            "integer class ids"
        ) from exc
    bad = [c for c in order if not 0 <= c < n_classes]
    if bad:
        raise ConfigError(
            f"class_order contains {bad}, outside the {n_classes} classes 0..{n_classes - 1}"
        )
    if len(set(order)) != len(order):
        dupes = sorted({c for c in order if order.count(c) > 1})
        raise ConfigError(f"class_order repeats classes {dupes}; each class may appear once")
    return order


def _task_sizes(
    n_tasks: int,
    classes_per_task: int | None,
    init_cls_num: int | None,
    inc_cls_num: int | None,
    available: int,
) -> list[int]:
    _check_positive("n_tasks", n_tasks)
    if classes_per_task is not None and (init_cls_num is not None or inc_cls_num is not None):
        raise ConfigError(
            f"classes_per_task={classes_per_task} conflicts with init_cls_num/inc_cls_num; "
            "give one or the other"
        )
    if init_cls_num is not None or inc_cls_num is not None:
        if init_cls_num is None:
            init_cls_num = inc_cls_num
        _check_positive("init_cls_num", init_cls_num)
        if inc_cls_num is None and n_tasks > 1:
            # Spread the remaining classes evenly over the remaining tasks.
            rest = available - init_cls_num
            if rest <= 0 or rest % (n_tasks - 1) != 0:
                raise ConfigError(
                    f"init_cls_num={init_cls_num} leaves {rest} of {available} classes, which do "
                    f"not split evenly into {n_tasks - 1} more tasks; set inc_cls_num"
                )
            inc_cls_num = rest // (n_tasks - 1)
        if n_tasks > 1:
            _check_positive("inc_cls_num", inc_cls_num)
        sizes = [init_cls_num] + [inc_cls_num] * (n_tasks - 1)
        described = f"init_cls_num={init_cls_num}, inc_cls_num={inc_cls_num}"
    else:
        if classes_per_task is None:
            if available % n_tasks != 0:
                raise ConfigError(
                    f"n_tasks={n_tasks} does not divide the {available} classes evenly; "
                    "set classes_per_task or init_cls_num/inc_cls_num"
                )
            classes_per_task = available // n_tasks
        _check_positive("classes_per_task", classes_per_task)
        sizes = [classes_per_task] * n_tasks
        described = f"classes_per_task={classes_per_task}"
    if sum(sizes) > available:
        raise ConfigError(
            f"n_tasks={n_tasks} with {described} needs {sum(sizes)} classes but only "
            f"{available} are available"
        )
    return sizes


def _validation_mask(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask over y marking round(fraction * n_c) random samples of every class c."""
    mask = torch.zeros(len(y), dtype=torch.bool)
    gen = _generator(seed, _STREAM_VALIDATION)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        n_val = round(fraction * len(idx))
        mask[idx[torch.randperm(len(idx), generator=gen)[:n_val]]] = True
    return mask


def class_split(
    split: ImageSplit,
    n_tasks: int,
    classes_per_task: int | None = None,
    init_cls_num: int | None = None,
    inc_cls_num: int | None = None,
    class_order: str | Sequence[int] = "random",
    seed: int = 0,
    validation: float = 0.0,
) -> list[Task]:
    """Class-incremental split: each task sees a disjoint group of classes.

    Labels are remapped to the position of the original class in the class order, so task t's
    labels are contiguous (task 0 gets 0..k-1, task 1 the next ones, ...). Classes beyond the
    ones the tasks need are dropped. ``validation`` holds out that fraction of each class's
    training samples as the task's validation set.
    """
    order = _class_order(class_order, split.n_classes, seed)
    sizes = _task_sizes(n_tasks, classes_per_task, init_cls_num, inc_cls_num, len(order))
    if isinstance(validation, bool) or not 0.0 <= validation < 1.0:
        raise ConfigError(f"validation={validation!r} is invalid; it must be in [0, 1)")

    # Lookup table from original to remapped label; -1 marks classes no task uses.
    remap = torch.full((split.n_classes,), -1, dtype=torch.long)
    remap[torch.tensor(order[: sum(sizes)], dtype=torch.long)] = torch.arange(sum(sizes))
    y_train = remap[split.y_train]
    y_test = remap[split.y_test]
    if validation > 0:
        val_mask = _validation_mask(split.y_train, validation, seed)
    else:
        val_mask = torch.zeros(len(y_train), dtype=torch.bool)

    tasks = []
    start = 0
    for size in sizes:
        stop = start + size
        in_train = (y_train >= start) & (y_train < stop)
        in_test = (y_test >= start) & (y_test < stop)
        train = in_train & ~val_mask
        val = in_train & val_mask
        tasks.append(
            Task(
                x_train=split.x_train[train],
                y_train=y_train[train],
                x_test=split.x_test[in_test],
                y_test=y_test[in_test],
                classes=list(range(start, stop)),
                x_val=split.x_train[val] if validation > 0 else None,
                y_val=y_train[val] if validation > 0 else None,
                param=order[start:stop],
            )
        )
        start = stop
    return tasks


def class_groups(
    split: ImageSplit, groups: Sequence[Sequence[int]], seed: int = 0, validation: float = 0.0
) -> list[Task]:
    """One task per group of original class ids, in the given order, labels remapped to
    contiguous ranges in that order (as `class_split`); `validation` holds out that fraction of
    every class's training samples."""
    if isinstance(validation, bool) or not 0.0 <= validation < 1.0:
        raise ConfigError(f"validation={validation!r} is invalid; it must be in [0, 1)")
    order = [c for group in groups for c in group]
    remap = torch.full((split.n_classes,), -1, dtype=torch.long)
    remap[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    y_train, y_test = remap[split.y_train], remap[split.y_test]
    val_mask = (_validation_mask(split.y_train, validation, seed) if validation > 0
                else torch.zeros(len(y_train), dtype=torch.bool))
    tasks, start = [], 0
    for group in groups:
        stop = start + len(group)
        in_train = (y_train >= start) & (y_train < stop)
        in_test = (y_test >= start) & (y_test < stop)
        train, val = in_train & ~val_mask, in_train & val_mask
        tasks.append(Task(
            x_train=split.x_train[train], y_train=y_train[train],
            x_test=split.x_test[in_test], y_test=y_test[in_test],
            classes=list(range(start, stop)),
            x_val=split.x_train[val] if validation > 0 else None,
            y_val=y_train[val] if validation > 0 else None,
            param=list(group),
        ))
        start = stop
    return tasks


def hat_cifar(split: ImageSplit, n_tasks: int = 10, seed: int = 0,
              validation: float = 0.0) -> list[Task]:
    """HAT's CIFAR benchmark on the `cifar10_100` source (110 classes): CIFAR-10 as 5 tasks of
    2 classes ({0,1}, {2,3}, ...), CIFAR-100 as 5 tasks of 20 (fine labels 0-19, 20-39, ...),
    the 10 tasks in the order the reference draws for `seed` (numpy's RandomState(seed)
    permutation, the same as its sklearn shuffle); `n_tasks` keeps the first tasks of that
    order. `Task.param` lists the task's original (source) class ids."""
    if split.n_classes != 110:
        raise ConfigError(f"scenario hat_cifar needs the cifar10_100 source (110 classes), got "
                          f"{split.n_classes} classes; choose dataset/source=cifar10_100")
    _check_positive("n_tasks", n_tasks)
    if n_tasks > 10:
        raise ConfigError(f"n_tasks={n_tasks} is invalid for hat_cifar; allowed: 1..10")
    groups = [[2 * k, 2 * k + 1] for k in range(5)]
    groups += [list(range(10 + 20 * k, 30 + 20 * k)) for k in range(5)]
    order = np.random.RandomState(int(seed)).permutation(10)[:n_tasks]
    return class_groups(split, [groups[i] for i in order], seed=seed, validation=validation)


def from_mer(
    mer: MerTasks, n_tasks: int | None = None, samples_per_task: int | None = None
) -> list[Task]:
    """Tasks from the preprocessed MER/La-MAML files.

    Like La-MAML, keeps the first ``n_tasks`` tasks and the first ``samples_per_task`` training
    samples of each (the files are already shuffled); the whole test set of each task is kept.
    """
    available = len(mer.train)
    if n_tasks is None:
        n_tasks = available
    _check_positive("n_tasks", n_tasks)
    if n_tasks > available:
        raise ConfigError(f"n_tasks={n_tasks} is more than the {available} tasks in the file")
    # Every task shares the label set, so the heads are sized from all labels in the file.
    labels = torch.cat([y for _, y in mer.train[:n_tasks] + mer.test[:n_tasks]])
    classes = torch.unique(labels).tolist()
    tasks = []
    for t in range(n_tasks):
        (x_tr, y_tr), (x_te, y_te) = mer.train[t], mer.test[t]
        size = _subset_size(samples_per_task, len(y_tr))
        tasks.append(
            Task(
                x_train=x_tr[:size],
                y_train=y_tr[:size],
                x_test=x_te,
                y_test=y_te,
                classes=classes,
                param=mer.params[t],
            )
        )
    return tasks


# Builders whose tasks have disjoint classes, so that a task id names a head: metacl.validate
# refuses a method that needs task ids at test time on any other scenario.
class_split.disjoint_classes = class_groups.disjoint_classes = hat_cifar.disjoint_classes = True
