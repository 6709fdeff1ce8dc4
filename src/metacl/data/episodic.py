"""Episodic data for few-shot meta-learning: N-way K-shot episodes, or sinusoid regression tasks.

A source is loaded once into memory (uint8 images, like the continual sources) and cut by class
into meta-train / val / test pools. An episode draws ``ways`` classes of one pool, ``shots``
support and ``query`` query images of each, and relabels the classes 0..ways-1 in a random order.
Episodes come in meta-batches of tasks with a leading task dimension::

    support_x (B, ways*shots, C, H, W)   support_y (B, ways*shots)   labels 0..ways-1
    query_x   (B, ways*query, C, H, W)   query_y   (B, ways*query)
    classes   (B, ways)                   pool-wide class id behind each episode label

Training meta-batches are drawn afresh from the meta-train pool on the training device. The
val and test episodes are drawn once, on the CPU, from a generator seeded with
``episode_seed`` only, so every run, method and device evaluates on the very same episodes.

Sources (the dataset config's ``source:`` node, a Hydra partial of one of them):
``load_omniglot`` (torchvision's files), ``load_miniimagenet`` (Ravi & Larochelle's split, CSVs +
images or the pickle cache), ``load_digits_fewshot`` (the bundled MNIST digits, offline) and
``Sinusoid`` (generated); each states its `EpisodicFacts`. See docs/fewshot.md for the on-disk
layouts.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor

from metacl.data.datamodule import check_limits
from metacl.data.safe_load import UnsafeFileError, load_pickle
from metacl.data.sources import _first_line, _root, facts_of, load_bundled, with_facts
from metacl.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
REGRESSION = "regression"
SPLITS = ("train", "val", "test")

# Class splits are part of the benchmark, not of the experiment: a constant seed, never the
# run's seed, so that every seed and method meta-trains and is tested on the same classes.
_SPLIT_SEED = 0
# Offsets that give the val and test episode generators their own streams of episode_seed.
_EPISODE_STREAMS = {"val": 1, "test": 2}
_CACHE_VERSION = 1


@dataclass(frozen=True)
class EpisodicFacts:
    """What an episodic source holds, known without reading it (metacl.validate reads it)."""

    name: str
    shape: tuple[int, ...]  # one sample as the model sees it: (C, H, W), or (1,)
    pools: tuple[int, int, int] | None = None  # meta-train/val/test classes fixed by the files
    split_counts_base: bool = False  # class_split counts base classes, x4 with rotations
    regression: bool = False


@dataclass(frozen=True)
class EpisodeInfo:
    """What a few-shot method needs to know about the episodes, whatever their source."""

    task: str  # "classification" or "regression"
    input_shape: tuple[int, ...]  # one sample as the model sees it: (C, H, W), or (1,)
    n_outputs: int  # the backbone's outputs: ways (classification) or 1 (regression)
    ways: int  # evaluation episodes; 1 for regression
    shots: int
    query: int
    train_ways: int  # meta-training episodes (ProtoNets train with more ways)
    train_shots: int
    train_query: int
    n_train_classes: int  # classes of the meta-train pool (0 for regression)

    @property
    def classification(self) -> bool:
        return self.task == CLASSIFICATION


class Episodes(NamedTuple):
    """A batch of episodes (tasks); every field has the task dimension first."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor  # (B, ways) class id in the pool behind each label; (B, 0) for regression

    @property
    def n_tasks(self) -> int:
        return self.support_x.shape[0]

    def select(self, index) -> Episodes:
        """The episodes at ``index`` (an int keeps a task dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Episodes(*(field[index] for field in self))


# --------------------------------------------------------------------------------------------
# Image class pools
# --------------------------------------------------------------------------------------------


class ClassPool:
    """The images of one split's classes; a class is a (base class, quarter turns) pair.

    ``images`` (M, C, H, W) uint8 are shared by all splits of a source. ``members`` (n_base,
    max_count) lists the images of every base class (padded), ``counts`` how many there are.
    Omniglot and the digits make each base class also a new class at 90, 180 and 270 degrees;
    those classes are rotated when an episode is assembled, not stored four times.
    """

    def __init__(self, images: Tensor, members: Tensor, counts: Tensor, classes: Tensor,
                 invert: bool) -> None:
        self.images, self.members, self.counts = images, members, counts
        self.classes = classes  # (n_classes, 2): base class, quarter turns
        self.invert = invert
        self.rotated = bool((classes[:, 1] != 0).any()) if len(classes) else False

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> ClassPool:
        return ClassPool(self.images.to(device), self.members.to(device), self.counts.to(device),
                         self.classes.to(device), self.invert)

    def min_count(self) -> int:
        return int(self.counts[self.classes[:, 0]].min()) if self.n_classes else 0

    def draw(self, n: int, ways: int, per_class: int, generator: torch.Generator
             ) -> tuple[Tensor, Tensor]:
        """Indices of n episodes: (n, ways) classes of the pool, (n, ways, per_class) images."""
        device = generator.device
        order = torch.rand(n, self.n_classes, generator=generator, device=device)
        cls = order.argsort(dim=1)[:, :ways]  # ways distinct classes, in a random order
        base = self.classes.to(device)[cls, 0]
        counts = self.counts.to(device)[base]  # (n, ways)
        width = self.members.shape[1]
        keys = torch.rand(n, ways, width, generator=generator, device=device)
        # Padding slots get keys above every real one, so they are never among the smallest.
        keys = keys.masked_fill(torch.arange(width, device=device) >= counts[..., None], 2.0)
        slots = keys.topk(per_class, dim=2, largest=False).indices
        images = self.members.to(device)[base[..., None], slots]
        return cls, images

    def assemble(self, cls: Tensor, images: Tensor, shots: int) -> Episodes:
        """Episodes from draw()'s indices: the first ``shots`` images of a class support it."""
        cls, images = cls.to(self.device), images.to(self.device)
        n, ways, per_class = images.shape
        x = self.images[images].float().div_(255)  # (n, ways, per_class, C, H, W)
        if self.invert:
            x = 1.0 - x
        if self.rotated:
            turns = self.classes[cls, 1]  # (n, ways)
            rotated = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
            x = rotated[turns, torch.arange(n, device=x.device)[:, None],
                        torch.arange(ways, device=x.device)[None, :]]
        labels = torch.arange(ways, device=x.device)[None, :, None].expand(n, ways, per_class)
        sample = x.shape[3:]
        return Episodes(
            support_x=x[:, :, :shots].reshape(n, ways * shots, *sample),
            support_y=labels[:, :, :shots].reshape(n, ways * shots),
            query_x=x[:, :, shots:].reshape(n, -1, *sample),
            query_y=labels[:, :, shots:].reshape(n, -1),
            classes=cls,
        )


@dataclass
class ImageSource:
    """A whole few-shot image dataset: shared images and the classes of each split."""

    images: Tensor  # (M, C, H, W) uint8
    labels: Tensor  # (M,) base class of every image
    split_classes: dict[str, Tensor]  # split -> (n, 2) (base class, quarter turns)
    invert: bool = False  # Omniglot: strokes become 1.0 on a 0.0 background (as the reference)

    def pools(self, limit_per_class: int | None) -> dict[str, ClassPool]:
        n_base = int(self.labels.max()) + 1 if len(self.labels) else 0
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=n_base)
        if limit_per_class:
            counts = counts.clamp(max=int(limit_per_class))
        width = int(counts.max()) if n_base else 0
        members = torch.zeros(n_base, width, dtype=torch.long)
        start = 0
        full = torch.bincount(self.labels, minlength=n_base)
        for c in range(n_base):
            members[c, : counts[c]] = order[start : start + counts[c]]
            start += int(full[c])
        return {split: ClassPool(self.images, members, counts, cls, self.invert)
                for split, cls in self.split_classes.items()}


def _with_turns(base: Tensor, rotations: bool) -> Tensor:
    """(n * 4, 2) or (n, 2) classes: every base class, at 0/90/180/270 degrees if rotations."""
    turns = torch.arange(4 if rotations else 1)
    return torch.stack([base.repeat_interleave(len(turns)), turns.repeat(len(base))], dim=1)


def _split_sizes(class_split, n: int, what: str, source: str) -> list[int]:
    sizes = [int(s) for s in class_split]
    if len(sizes) != 3 or any(s < 0 for s in sizes) or sum(sizes) != n:
        raise ConfigError(
            f"dataset.source.class_split={list(class_split)} is invalid for {source}: it needs "
            f"three sizes (meta-train, val, test) that add up to its {n} {what}"
        )
    return sizes


def _split_by_seed(n: int, sizes: list[int]) -> dict[str, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    bounds = np.cumsum([0, *sizes])
    return {split: perm[bounds[i] : bounds[i + 1]].sort().values
            for i, split in enumerate(SPLITS)}


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

OMNIGLOT_FOLDER = "omniglot-py"
OMNIGLOT_PARTS = ("images_background", "images_evaluation")
OMNIGLOT_SIZE = 28
OMNIGLOT_CACHE = f"metacl_cache_{OMNIGLOT_SIZE}.pt"


def _decode_gray(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            return np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise DataNotFoundError(f"cannot read Omniglot image {path} ({_first_line(exc)})") from exc


def _omniglot_characters(folder: Path) -> list[Path]:
    characters = []
    for part in OMNIGLOT_PARTS:
        for alphabet in sorted(p for p in (folder / part).iterdir() if p.is_dir()):
            characters += sorted(p for p in alphabet.iterdir() if p.is_dir())
    return characters


def _read_cache(path: Path, expected: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("ignoring unreadable cache %s (%s)", path, _first_line(exc))
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in expected.items()):
        return None
    return data


def _write_cache(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(data, tmp)
        tmp.replace(path)
    except OSError as exc:  # a read-only data folder still works, just slower next time
        log.warning("could not write cache %s (%s)", path, _first_line(exc))
        tmp.unlink(missing_ok=True)


@with_facts(EpisodicFacts("omniglot", (1, 28, 28), split_counts_base=True))
def load_omniglot(*, data_dir, download: bool = False, class_split=(1100, 100, 423),
                  rotations: bool = True) -> ImageSource:
    """Omniglot in torchvision's layout, both parts, resized to 28x28 (Lanczos) and cached.

    ``<data_dir>/omniglot-py/images_background/<alphabet>/<character>/*.png`` and
    ``images_evaluation/``; the 1623 characters (sorted by part, alphabet, name) are split by a
    fixed seed into 1100 / 100 / 423, and each is also a class at 90, 180 and 270 degrees.
    """
    root = _root(data_dir)
    folder = root / OMNIGLOT_FOLDER
    missing = [p for p in OMNIGLOT_PARTS if not (folder / p).is_dir()]
    if missing and download:
        from torchvision.datasets import Omniglot

        try:
            for part in missing:
                Omniglot(str(root), background=part == "images_background", download=True)
        except Exception as exc:  # any failure here just means the files are not there
            raise DataNotFoundError(
                f"could not download Omniglot into {folder} ({_first_line(exc)}); unzip "
                f"{' and '.join(p + '.zip' for p in missing)} there by hand"
            ) from exc
        missing = [p for p in OMNIGLOT_PARTS if not (folder / p).is_dir()]
    if missing:
        raise DataNotFoundError(
            f"Omniglot not found: unzip {' and '.join(p + '.zip' for p in missing)} into "
            f"{folder}/ (torchvision's layout) or pass dataset.source.download=true"
        )
    characters = _omniglot_characters(folder)
    names = [str(c.relative_to(folder)) for c in characters]
    cache = folder / OMNIGLOT_CACHE
    data = _read_cache(cache, {"version": _CACHE_VERSION, "characters": names})
    if data is None:
        paths, labels = [], []
        for label, character in enumerate(characters):
            files = sorted(character.glob("*.png"))
            if not files:
                raise DataNotFoundError(f"Omniglot character folder {character} has no .png")
            paths += files
            labels += [label] * len(files)
        log.info("decoding %d Omniglot images once", len(paths))
        arrays = [_decode_gray(p, OMNIGLOT_SIZE) for p in paths]
        data = {"version": _CACHE_VERSION, "characters": names,
                "images": torch.from_numpy(np.stack(arrays)).unsqueeze(1).contiguous(),
                "labels": torch.tensor(labels, dtype=torch.long)}
        _write_cache(cache, data)
    sizes = _split_sizes(class_split, len(characters), "characters", "omniglot")
    splits = _split_by_seed(len(characters), sizes)
    return ImageSource(data["images"], data["labels"],
                       {s: _with_turns(c, rotations) for s, c in splits.items()}, invert=True)


MINI_FOLDER = "miniimagenet"
MINI_SIZE = 84
MINI_CACHE = f"metacl_cache_{MINI_SIZE}.pt"
MINI_PICKLE = "mini-imagenet-cache-{split}.pkl"


def _unpickle_mini(path: Path) -> tuple[np.ndarray, dict]:
    try:  # restricted: numpy arrays and plain values only, anything else is refused unrun
        data = load_pickle(path, "miniImageNet")
    except UnsafeFileError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataNotFoundError(f"cannot read {path} ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise DataNotFoundError(f"{path} holds a {type(data).__name__}, not a dict")
    data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    if "image_data" not in data or "class_dict" not in data:
        raise DataNotFoundError(f"{path} has no 'image_data' and 'class_dict' entries")
    return np.asarray(data["image_data"]), data["class_dict"]


def _mini_from_pickles(folder: Path) -> dict:
    images, labels, wnids, split_of = [], [], [], {}
    for split in SPLITS:
        array, class_dict = _unpickle_mini(folder / MINI_PICKLE.format(split=split))
        if array.ndim != 4 or array.shape[1:] != (MINI_SIZE, MINI_SIZE, 3):
            raise DataNotFoundError(f"{folder / MINI_PICKLE.format(split=split)} holds images "
                                    f"of shape {array.shape[1:]}, expected (84, 84, 3)")
        y = np.full(len(array), -1, dtype=np.int64)
        split_of[split] = []
        for wnid, idx in sorted(class_dict.items()):
            wnid = wnid.decode() if isinstance(wnid, bytes) else str(wnid)
            y[np.asarray(idx, dtype=np.int64)] = len(wnids)
            split_of[split].append(len(wnids))
            wnids.append(wnid)
        keep = y >= 0
        images.append(torch.from_numpy(array[keep]).permute(0, 3, 1, 2))
        labels.append(torch.from_numpy(y[keep]))
    return {"images": torch.cat(images).contiguous(), "labels": torch.cat(labels),
            "split_of": split_of, "wnids": wnids}


def _mini_from_csvs(folder: Path) -> dict:
    paths, labels, wnids, split_of = [], [], [], {}
    for split in SPLITS:
        with open(folder / f"{split}.csv", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][:2] == ["filename", "label"]:
            rows = rows[1:]
        first = len(wnids)
        for filename, wnid in sorted(rows, key=lambda r: (r[1], r[0])):
            if not wnids[first:] or wnids[-1] != wnid:
                wnids.append(wnid)
            paths.append(folder / "images" / filename)
            labels.append(len(wnids) - 1)
        split_of[split] = list(range(first, len(wnids)))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(f"miniImageNet image {missing[0]} named in the CSVs is missing "
                                f"({len(missing)} missing in all)")
    log.info("decoding %d miniImageNet images once", len(paths))
    return {"images": _decode_all_rgb(paths), "labels": torch.tensor(labels, dtype=torch.long),
            "split_of": split_of, "wnids": wnids}


def _decode_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (MINI_SIZE, MINI_SIZE):
                img = img.resize((MINI_SIZE, MINI_SIZE), Image.Resampling.LANCZOS)
            return np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise DataNotFoundError(f"cannot read miniImageNet image {path} ({_first_line(exc)})"
                                ) from exc


def _decode_all_rgb(paths: list[Path]) -> Tensor:
    # PIL releases the GIL while decoding, so threads speed up the 60,000 JPEGs.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode_rgb, paths, chunksize=256))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@with_facts(EpisodicFacts("miniimagenet", (3, 84, 84), pools=(64, 16, 20)))
def load_miniimagenet(*, data_dir) -> ImageSource:
    """miniImageNet with Ravi & Larochelle's split (64 / 16 / 20 classes, 600 images each).

    Reads ``<data_dir>/miniimagenet/`` in either common form: the pickle cache
    ``mini-imagenet-cache-{train,val,test}.pkl`` (dicts of 'image_data' (N, 84, 84, 3) uint8 and
    'class_dict' wnid -> indices), or the split CSVs ``{train,val,test}.csv`` (filename,label)
    with the JPEGs in ``images/`` (decoded once, resized to 84x84, cached).
    """
    folder = _root(data_dir) / MINI_FOLDER
    pickles = [folder / MINI_PICKLE.format(split=s) for s in SPLITS]
    csvs = [folder / f"{s}.csv" for s in SPLITS]
    if all(p.is_file() for p in pickles):
        data = _mini_from_pickles(folder)
    elif all(p.is_file() for p in csvs) and (folder / "images").is_dir():
        listing = {s: (folder / f"{s}.csv").read_text() for s in SPLITS}
        data = _read_cache(folder / MINI_CACHE, {"version": _CACHE_VERSION, "csv": listing})
        if data is None:
            data = {"version": _CACHE_VERSION, "csv": listing, **_mini_from_csvs(folder)}
            _write_cache(folder / MINI_CACHE, data)
    else:
        raise DataNotFoundError(
            f"miniImageNet not found: put {', '.join(p.name for p in pickles)} in {folder}/, "
            f"or Ravi & Larochelle's {', '.join(p.name for p in csvs)} with the images in "
            f"{folder}/images/"
        )
    split_classes = {s: _with_turns(torch.tensor(data["split_of"][s], dtype=torch.long), False)
                     for s in SPLITS}
    return ImageSource(data["images"], data["labels"], split_classes)


@with_facts(EpisodicFacts("digits_fewshot", (1, 28, 28)))
def load_digits_fewshot(*, class_split=(24, 6, 10), rotations: bool = True) -> ImageSource:
    """The bundled MNIST digits (5,000, train and test pooled): each digit at 0/90/180/270
    degrees is a class (40 classes), split by a fixed seed into meta-train / val / test."""
    split = load_bundled()
    images = torch.cat([split.x_train, split.x_test])
    labels = torch.cat([split.y_train, split.y_test])
    classes = _with_turns(torch.arange(split.n_classes), rotations)
    sizes = _split_sizes(class_split, len(classes), "digit classes", "digits_fewshot")
    parts = _split_by_seed(len(classes), sizes)
    return ImageSource(images, labels, {s: classes[idx] for s, idx in parts.items()})


# --------------------------------------------------------------------------------------------
# Sinusoid regression
# --------------------------------------------------------------------------------------------


@with_facts(EpisodicFacts("sinusoid", (1,), regression=True))
class Sinusoid:
    """Tasks y = A sin(x - phase), A ~ U[amplitude], phase ~ U[phase], x ~ U[x_range]."""

    def __init__(self, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        self.amplitude = tuple(float(a) for a in amplitude)
        self.phase = tuple(float(p) for p in phase)
        self.x_range = tuple(float(x) for x in x_range)

    def draw(self, n: int, points: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        device = generator.device

        def uniform(bounds, *shape):
            low, high = bounds
            return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

        amplitude, phase = uniform(self.amplitude, n, 1, 1), uniform(self.phase, n, 1, 1)
        x = uniform(self.x_range, n, points, 1)
        return x, amplitude * torch.sin(x - phase)

    @staticmethod
    def assemble(x: Tensor, y: Tensor, shots: int) -> Episodes:
        empty = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
        return Episodes(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:], empty)


# --------------------------------------------------------------------------------------------
# Episode streams
# --------------------------------------------------------------------------------------------


class EpisodeStream:
    """``n_batches`` fresh meta-batches of ``tasks`` episodes each (one training epoch).

    ``start`` > 0 (a resumed run) makes the next epoch begin after that many meta-batches: the
    generator's state was restored, so the rest of the epoch draws what it drew originally.
    """

    def __init__(self, draw, n_batches: int, tasks: int, start: int = 0) -> None:
        self.draw, self.n_batches, self.tasks = draw, n_batches, tasks
        self.start = int(start)
        self.epoch_start_batch = 0  # meta-batches of this epoch done before the iteration began

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Episodes]:
        self.epoch_start_batch, self.start = self.start, 0
        for _ in range(self.n_batches - self.epoch_start_batch):
            yield self.draw(self.tasks)


class FixedEpisodes:
    """Episodes drawn once (CPU generator), materialised on the device batch by batch."""

    def __init__(self, indices: tuple[Tensor, ...], assemble) -> None:
        self.indices, self.assemble = indices, assemble

    def __len__(self) -> int:
        return len(self.indices[0])

    def batches(self, batch_size: int) -> Iterator[Episodes]:
        for start in range(0, len(self), batch_size):
            yield self.assemble(*(t[start : start + batch_size] for t in self.indices))


class EpisodicDataModule(pl.LightningDataModule):
    """Few-shot episodes for meta-training (``train_dataloader``) and fixed val/test episodes.

    An epoch is ``meta_batches_per_epoch`` meta-batches of ``meta_batch_size`` tasks (the loop
    sets ``meta_batch_size`` from the method). ``train_ways``/``train_shots``/``train_query``
    (null: as for evaluation) shape the meta-training episodes only.

    The debug keys shared with the continual datamodule mean, for episodes:
    ``limit_tasks`` caps the meta-batches per epoch, ``limit_train_per_task`` caps the images
    kept per class, ``limit_test_per_task`` caps the val and test episodes.
    """

    protocol = "episodic"

    def __init__(
        self,
        source: Callable[[], ImageSource | Sinusoid],
        ways: int = 5,
        shots: int = 1,
        query: int = 15,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_query: int | None = None,
        meta_batches_per_epoch: int = 1000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        episode_seed: int = 0,
        seed: int = 0,
        limit_tasks: int | None = None,
        limit_train_per_task: int | None = None,
        limit_test_per_task: int | None = None,
    ):
        super().__init__()
        facts = facts_of(source) if callable(source) else None
        if not isinstance(facts, EpisodicFacts):
            raise ConfigError(f"dataset.source={source!r} is not an episodic source; allowed: "
                              "a node with the _target_ of a loader of metacl.data.episodic")
        self.source, self.name = source, facts.name
        regression = facts.regression
        self.task = REGRESSION if regression else CLASSIFICATION
        if regression and (ways != 1 or train_ways not in (None, 1)):
            raise ConfigError(f"dataset.ways={ways} is meaningless for sinusoid regression; "
                              "set it to 1")
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.train_ways = int(train_ways or ways)
        self.train_shots = int(train_shots or shots)
        self.train_query = int(train_query or query)
        for name in ("ways", "shots", "query", "train_ways", "train_shots", "train_query"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dataset.{name}={getattr(self, name)} must be at least 1")
        check_limits(limit_tasks=limit_tasks, limit_train_per_task=limit_train_per_task,
                     limit_test_per_task=limit_test_per_task)
        if limit_tasks:
            meta_batches_per_epoch = min(int(meta_batches_per_epoch), int(limit_tasks))
        if limit_test_per_task:
            val_episodes = min(int(val_episodes), int(limit_test_per_task))
            test_episodes = min(int(test_episodes), int(limit_test_per_task))
        self.meta_batches_per_epoch = int(meta_batches_per_epoch)
        self.n_episodes = {"val": int(val_episodes), "test": int(test_episodes)}
        if self.meta_batches_per_epoch < 1 or self.n_episodes["test"] < 1:
            raise ConfigError("dataset.meta_batches_per_epoch and dataset.test_episodes must be "
                              "at least 1")
        self.episode_seed, self.seed = int(episode_seed), int(seed)
        self.limit_per_class = limit_train_per_task
        self.meta_batch_size = 1  # set by the loop from the method's meta_batch_size
        self.device = torch.device("cpu")
        self.pools: dict[str, ClassPool] | None = None
        self.sinusoid: Sinusoid | None = None
        self.fixed: dict[str, FixedEpisodes] = {}
        self.input_shape: tuple[int, ...] = (1,)
        self.generator: torch.Generator | None = None
        self.train_loader: EpisodeStream | None = None
        self._resume_batch = 0

    # ------------------------------------------------------------------ building
    def build(self) -> EpisodicDataModule:
        if self.pools is not None or self.sinusoid is not None:
            return self
        data = self.source()
        if isinstance(data, Sinusoid):
            self.sinusoid = data
            self.input_shape = (1,)
        else:
            self.pools = data.pools(self.limit_per_class)
            self.input_shape = tuple(data.images.shape[1:])
            self._check_pools()
        for split in ("val", "test"):
            self.fixed[split] = self._fixed_episodes(split)
        self.to(self.device)
        return self

    def _check_pools(self) -> None:
        needs = {"train": (self.train_ways, self.train_shots + self.train_query)}
        needs.update({s: (self.ways, self.shots + self.query) for s in ("val", "test")})
        for split, (ways, per_class) in needs.items():
            if split == "val" and not self.n_episodes["val"]:
                continue
            pool = self.pools[split]
            if pool.n_classes < ways:
                raise ConfigError(f"{ways}-way episodes need {ways} classes but the {split} "
                                  f"split of {self.name} has {pool.n_classes}")
            if pool.min_count() < per_class:
                raise ConfigError(
                    f"{split} episodes need {per_class} images per class (shots + query) but "
                    f"a class of {self.name} has only {pool.min_count()}"
                    + (" (dataset.limit_train_per_task)" if self.limit_per_class else ""))

    def _fixed_episodes(self, split: str) -> FixedEpisodes:
        n = self.n_episodes[split]
        gen = torch.Generator().manual_seed(self.episode_seed * 1_000_003
                                            + _EPISODE_STREAMS[split])
        if self.sinusoid is not None:
            x, y = self.sinusoid.draw(n, self.shots + self.query, gen)
            return FixedEpisodes((x, y), lambda x, y: Sinusoid.assemble(
                x.to(self.device), y.to(self.device), self.shots))
        if n == 0:
            return FixedEpisodes((torch.zeros(0),), None)
        cls, images = self.pools[split].draw(n, self.ways, self.shots + self.query, gen)
        return FixedEpisodes((cls, images), lambda cls, images: self.pools[split].assemble(
            cls, images, self.shots))

    def to(self, device) -> EpisodicDataModule:
        """Keep the images (and the training episode generator) on the training device."""
        self.device = torch.device(device)
        if self.pools is not None:
            self.pools = {s: p.to(self.device) for s, p in self.pools.items()}
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self

    # ------------------------------------------------------------------ episodes
    @property
    def episode_info(self) -> EpisodeInfo:
        self.build()
        classification = self.task == CLASSIFICATION
        return EpisodeInfo(
            task=self.task, input_shape=self.input_shape,
            n_outputs=self.ways if classification else 1,
            ways=self.ways, shots=self.shots, query=self.query, train_ways=self.train_ways,
            train_shots=self.train_shots, train_query=self.train_query,
            n_train_classes=self.pools["train"].n_classes if classification else 0,
        )

    def draw_train(self, tasks: int) -> Episodes:
        """A fresh meta-batch of meta-training episodes on the device."""
        self.build()
        if self.sinusoid is not None:
            x, y = self.sinusoid.draw(tasks, self.train_shots + self.train_query, self.generator)
            return Sinusoid.assemble(x, y, self.train_shots)
        pool = self.pools["train"]
        cls, images = pool.draw(tasks, self.train_ways, self.train_shots + self.train_query,
                                self.generator)
        return pool.assemble(cls, images, self.train_shots)

    def train_dataloader(self) -> EpisodeStream:
        self.train_loader = EpisodeStream(self.draw_train, self.meta_batches_per_epoch,
                                          self.meta_batch_size, start=self._resume_batch)
        self._resume_batch = 0
        return self.train_loader

    def resume_train_at(self, order, batch: int) -> None:
        """The next train_dataloader() begins its first epoch after `batch` meta-batches (a
        resumed run; the caller restores ``generator``'s state). Episodes have no shuffle
        order to replay: `order` must be None."""
        if order is not None:
            raise ValueError("episodic training draws fresh episodes; there is no order")
        self._resume_batch = int(batch)

    def eval_episodes(self, split: str) -> FixedEpisodes:
        """The fixed ``val`` or ``test`` episodes (``batches(n)`` yields them on the device)."""
        if split not in self.n_episodes:
            raise ConfigError(f"unknown evaluation split '{split}'; allowed: val, test")
        return self.build().fixed[split]

    def describe(self) -> str:
        if self.task == REGRESSION:
            return f"sinusoid {self.shots}-shot"
        return f"{self.name} {self.ways}-way {self.shots}-shot"
