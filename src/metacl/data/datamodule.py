"""ContinualDataModule: builds every task once, keeps them on the training device, streams one.

Batches are index draws into in-memory tensors (no worker processes, no per-sample PIL);
scaling, normalisation and augmentation are batched tensor ops on the device.

Validation: `validation` (a fraction in [0, 1)) holds out that share of every class's training
samples of every task as the task's validation split (`eval_dataloaders("val")`), which
hyperparameter searches optimise instead of the test split. Class splits do this in the scenario
(La-MAML's 10%); for the other scenarios (rotated/permuted MNIST, the MER files) the datamodule
does it after building the tasks, with its own seeded generator, before any `limit_*` subset.
The held-out samples are removed from the task's training data. `limit_test_per_task` caps the
validation split as well (both are evaluation splits).

Separate heads: `separate_heads=True` gives every task its own output units (task t's labels
are shifted past those of the tasks before it), so a scenario whose tasks share labels (permuted
MNIST) is evaluated task-aware with one head per task, as HAT's benchmarks are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor

from metacl.data.scenarios import Task, from_mer
from metacl.data.sources import ImageSplit, MerTasks
from metacl.errors import ConfigError
from metacl.task_info import TaskInfo

# Seeds the datamodule's own validation hold-out (a stream apart from the debug subsets').
_VALIDATION_STREAM = 7


def hold_out_validation(task: Task, fraction: float, gen: torch.Generator) -> None:
    """Move round(fraction * n_c) random training samples of every class c to the validation
    split of `task` (in place); the rest stays for training."""
    y = task.y_train
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        n_val = round(fraction * len(idx))
        mask[idx[torch.randperm(len(idx), generator=gen)[:n_val]]] = True
    task.x_val, task.y_val = task.x_train[mask], y[mask]
    task.x_train, task.y_train = task.x_train[~mask], y[~mask]


LIMIT_KEYS = ("limit_tasks", "limit_train_per_task", "limit_test_per_task")


def check_limits(**limits) -> None:
    """`limit_*` keep the first N tasks / N samples: null (all) or an integer >= 1. A 0 used to
    mean "no limit" for tasks (all 20 ran) and "nothing" for samples (a run that trained on
    nothing and reported "completed"); a negative count dropped tasks from the end."""
    for key, value in limits.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"dataset.{key}={value!r} is invalid; allowed: null (all) or an "
                              "integer >= 1")


def check_splits(tasks: list[Task], validation: float) -> None:
    """Every task keeps training and test samples, and a validation split it was given is not
    empty (a tiny dataset.validation rounds to 0 samples per class; evaluating on nothing
    divided by zero)."""
    for t, task in enumerate(tasks):
        if len(task.y_train) == 0:
            raise ConfigError(f"task {t} has no training samples left (dataset.validation="
                              f"{validation} held out all of them); allowed: a smaller "
                              "dataset.validation")
        if len(task.y_test) == 0:
            raise ConfigError(f"task {t} has no test samples; check the dataset's files")
        if task.y_val is not None and len(task.y_val) == 0:
            fewest = int(torch.unique(task.y_train, return_counts=True)[1].min())
            raise ConfigError(f"dataset.validation={validation} holds out no sample of task {t} "
                              f"(its smallest class has {fewest} training samples); allowed: 0 "
                              f"(no validation split) or a fraction >= {1 / fewest:.2g}")


def offset_labels(tasks: list[Task]) -> None:
    """Give each task its own output units: task t's k-th class becomes label
    (classes of tasks < t) + k, in every split (in place)."""
    offset = 0
    for task in tasks:
        remap = torch.full((max(task.classes) + 1,), -1, dtype=torch.long)
        remap[torch.tensor(task.classes)] = torch.arange(len(task.classes)) + offset
        for name in ("y_train", "y_test", "y_val"):
            y = getattr(task, name)
            if y is not None:
                setattr(task, name, remap[y])
        task.classes = list(range(offset, offset + len(task.classes)))
        offset += len(task.classes)


class TensorBatches:
    """An iterable of (x, y, t) batches drawn from tensors that already sit on the device.

    `prepare` turns a raw batch into model input (None: yield the raw tensors; the training
    loader leaves it to the datamodule's `on_after_batch_transfer`). A shuffled loader draws one
    order per epoch and keeps it in `order`; `resume_at(order, batch)` makes the next epoch
    replay a stored order from a given batch (resuming a checkpoint taken inside an epoch),
    without drawing from the random generator. `epoch_start_batch` is where the current epoch
    began (0, or the resumed batch).
    """

    def __init__(self, x: Tensor, y: Tensor, t: Tensor, batch_size: int, shuffle: bool,
                 prepare=None):
        self.x, self.y, self.t = x, y, t
        self.batch_size, self.shuffle, self.prepare = batch_size, shuffle, prepare
        self.order: Tensor | None = None
        self.epoch_start_batch = 0
        self._resume: tuple[Tensor, int] | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def resume_at(self, order: Tensor | None, batch: int) -> None:
        self._resume = (order, int(batch))

    @property
    def resume_batch(self) -> int:
        """The batch the next epoch starts at: 0 unless resume_at set one."""
        return 0 if self._resume is None else self._resume[1]

    def __iter__(self):
        n = len(self.y)
        first = 0
        if self._resume is not None:
            order, first = self._resume
            self._resume = None
            order = None if order is None else order.to(self.y.device)
        elif self.shuffle:
            order = torch.randperm(n, device=self.y.device)
        else:
            order = None
        self.order, self.epoch_start_batch = order, first
        for start in range(first * self.batch_size, n, self.batch_size):
            if order is None:
                idx = slice(start, start + self.batch_size)
            else:
                idx = order[start : start + self.batch_size]
            x = self.x[idx] if self.prepare is None else self.prepare(self.x[idx])
            yield x, self.y[idx], self.t[idx]


def random_crop_flip(x: Tensor, padding: int = 4) -> Tensor:
    """Random crop with zero padding + horizontal flip, per sample, as one batched gather."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    flip = torch.rand(b, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class ContinualDataModule(pl.LightningDataModule):
    """Every task of a benchmark, built once from `source` and `scenario`.

    `source`: a loader called with no arguments (a Hydra partial of one of
    `metacl.data.sources`, chosen with `dataset/source=<name>`), giving an `ImageSplit`, or the
    `MerTasks` of a preprocessed MER/La-MAML file, which holds its tasks already (then the first
    `n_tasks` tasks and `samples_per_task` training samples of each are kept, as La-MAML).
    `scenario`: a builder called with the `ImageSplit` (a Hydra partial of one of
    `metacl.data.scenarios`, its arguments set in the dataset's config).
    """

    protocol = "continual"  # a stream of tasks (metacl.runner.main.LOOPS)

    def __init__(
        self,
        source: Callable[[], ImageSplit | MerTasks],
        scenario: Callable[[ImageSplit], list[Task]],
        n_tasks: int | None = None,
        samples_per_task: int | str | None = None,
        validation: float = 0.0,
        separate_heads: bool = False,
        augment: bool = False,
        mean=None,
        std=None,
        batch_size: int = 10,
        eval_batch_size: int = 1000,
        seed: int = 0,
        limit_tasks: int | None = None,
        limit_train_per_task: int | None = None,
        limit_test_per_task: int | None = None,
    ):
        super().__init__()
        for key, value in (("source", source), ("scenario", scenario)):
            if not callable(value):
                raise ConfigError(f"dataset.{key}={value!r} is not a {key} config; "
                                  f"allowed: a node with a _target_ (docs/datasets.md)")
        self.source, self.scenario, self.seed = source, scenario, seed
        self.n_tasks_requested, self.samples_per_task = n_tasks, samples_per_task
        if isinstance(validation, bool) or not 0.0 <= float(validation or 0.0) < 1.0:
            raise ConfigError(f"dataset.validation={validation!r} is invalid; it must be a "
                              "fraction in [0, 1)")
        self.validation = float(validation or 0.0)
        self.separate_heads = bool(separate_heads)
        self.augment = augment
        self.mean = None if mean is None else torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(list(std)).view(1, -1, 1, 1)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        check_limits(limit_tasks=limit_tasks, limit_train_per_task=limit_train_per_task,
                     limit_test_per_task=limit_test_per_task)
        self.limits = (limit_tasks, limit_train_per_task, limit_test_per_task)
        self.tasks: list[Task] | None = None
        self.current = 0
        self.train_tasks: list[int] = [0]
        self.device = torch.device("cpu")
        self.train_loader: TensorBatches | None = None  # the last train_dataloader()
        self._train_resume: tuple[Tensor | None, int] | None = None

    # ------------------------------------------------------------------ building
    def build(self) -> ContinualDataModule:
        if self.tasks is not None:
            return self
        data = self.source()
        if isinstance(data, MerTasks):  # the file holds its tasks already
            tasks = from_mer(data, n_tasks=self.n_tasks_requested,
                             samples_per_task=self.samples_per_task)
        else:
            tasks = self.scenario(data)
        if self.validation > 0 and any(task.x_val is None for task in tasks):
            # Scenarios without their own validation split (MNIST rotations/permutations, MER).
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + _VALIDATION_STREAM)
            for task in tasks:
                hold_out_validation(task, self.validation, gen)
        check_splits(tasks, self.validation)  # before the limits, which keep at least one
        if self.separate_heads:
            offset_labels(tasks)
        self.tasks = self._limited(tasks)
        return self

    def _limited(self, tasks: list[Task]) -> list[Task]:
        """The debug limits: the first `limit_tasks` tasks, seeded random subsets of each."""
        limit_tasks, limit_train, limit_test = self.limits
        if limit_tasks:
            tasks = tasks[:limit_tasks]
        if limit_train or limit_test:
            # A seeded random subset, so a small debug run still sees every class.
            gen = torch.Generator().manual_seed(self.seed)
            for task in tasks:
                keep = torch.randperm(len(task.y_train), generator=gen)[:limit_train]
                task.x_train, task.y_train = task.x_train[keep], task.y_train[keep]
                keep = torch.randperm(len(task.y_test), generator=gen)[:limit_test]
                task.x_test, task.y_test = task.x_test[keep], task.y_test[keep]
                if task.y_val is not None and limit_test:
                    keep = torch.randperm(len(task.y_val), generator=gen)[:limit_test]
                    task.x_val, task.y_val = task.x_val[keep], task.y_val[keep]
        return tasks

    def to(self, device) -> ContinualDataModule:
        """Move every task's tensors to the training device once."""
        self.build()
        self.device = torch.device(device)
        for task in self.tasks:
            for name in ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val"):
                value = getattr(task, name)
                if value is not None:
                    setattr(task, name, value.to(self.device))
        return self

    @property
    def has_validation(self) -> bool:
        """Whether every task has a validation split (`dataset.validation > 0`)."""
        return all(task.y_val is not None for task in self.build().tasks)

    @property
    def n_tasks(self) -> int:
        return len(self.build().tasks)

    @property
    def task_info(self) -> TaskInfo:
        tasks = self.build().tasks
        n_outputs = max(max(task.classes) for task in tasks) + 1
        domain = all(task.classes == tasks[0].classes for task in tasks)
        return TaskInfo(
            n_tasks=len(tasks),
            input_shape=tuple(tasks[0].x_train.shape[1:]),
            n_outputs=n_outputs,
            task_classes=tuple(tuple(task.classes) for task in tasks),
            scenario="domain" if domain else "class",
        )

    # ------------------------------------------------------------------ streaming
    def set_task(self, t: int, train_tasks: list[int] | None = None) -> None:
        """Stream task t next (or the union of `train_tasks`, e.g. for the joint oracle)."""
        self.current = t
        self.train_tasks = [t] if train_tasks is None else list(train_tasks)

    def prepare_batch(self, x: Tensor, train: bool) -> Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if train and self.augment:
            x = random_crop_flip(x)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def train_dataloader(self) -> TensorBatches:
        """Raw batches (stored dtype) of the tasks being trained; Lightning makes them model
        input through `on_after_batch_transfer`, right before each training step. Preparing
        there, not while the batch is fetched, keeps augmentation's random draws out of
        Lightning's one-batch prefetch, so a checkpoint taken after a step holds exactly the
        generator state the next step starts from."""
        tasks = [self.tasks[u] for u in self.train_tasks]
        x = torch.cat([task.x_train for task in tasks])
        y = torch.cat([task.y_train for task in tasks])
        t = torch.cat(
            [torch.full_like(task.y_train, u) for u, task in zip(self.train_tasks, tasks)]
        )
        self.train_loader = TensorBatches(x, y, t, self.batch_size, True)
        if self._train_resume is not None:
            self.train_loader.resume_at(*self._train_resume)
            self._train_resume = None
        return self.train_loader

    def resume_train_at(self, order: Tensor | None, batch: int) -> None:
        """The next train_dataloader() starts its first epoch at `batch` of the stored shuffle
        `order` (resuming a checkpoint taken inside an epoch; metacl.checkpoint)."""
        self._train_resume = (order, int(batch))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, t = batch
        return self.prepare_batch(x, True), y, t

    def eval_dataloaders(self, split: str = "test") -> list[TensorBatches]:
        """One loader per task over its test (or validation) data, unshuffled, no augmentation."""
        loaders = []
        for u, task in enumerate(self.tasks):
            x, y = (task.x_test, task.y_test) if split == "test" else (task.x_val, task.y_val)
            if x is None:
                raise ConfigError(f"split '{split}' is empty; set dataset.validation > 0")
            loaders.append(
                TensorBatches(
                    x,
                    y,
                    torch.full_like(y, u),
                    self.eval_batch_size,
                    False,
                    lambda batch: self.prepare_batch(batch, False),
                )
            )
        return loaders
