"""Dataset sources, loaded from small fixture files written in each dataset's on-disk format."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from metacl.data import sources
from metacl.data.sources import (
    MER_FILES,
    TINYIMAGENET_CACHE,
    load_bundled,
    load_cifar10,
    load_cifar100,
    load_mer,
    load_mnist,
    load_tinyimagenet,
)
from metacl.errors import ConfigError, DataNotFoundError

# ------------------------------------------------------------------------------------------
# Bundled
# ------------------------------------------------------------------------------------------


def test_bundled_split_sizes_and_types():
    split = load_bundled()
    assert split.x_train.shape == (4000, 1, 28, 28)
    assert split.x_test.shape == (1000, 1, 28, 28)
    assert split.x_train.dtype == torch.uint8 and split.x_test.dtype == torch.uint8
    assert split.y_train.dtype == torch.int64 and split.y_test.dtype == torch.int64
    assert split.n_classes == 10
    assert torch.bincount(split.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(split.y_test, minlength=10).tolist() == [100] * 10
    # Real digits: mostly background, but strokes reach full intensity.
    assert split.x_train.float().mean() > 10
    assert split.x_train.max() == 255


def test_bundled_split_is_fixed_and_disjoint():
    a, b = load_bundled(), load_bundled()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    # No test digit also appears in the training set.
    train_rows = {bytes(row.numpy()) for row in a.x_train.flatten(1)}
    assert not any(bytes(row.numpy()) in train_rows for row in a.x_test.flatten(1))


# ------------------------------------------------------------------------------------------
# MNIST
# ------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the big-endian idx format (magic 0x0000 08 <ndim>)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        _write_idx(raw / name, array)
    return arrays


def test_mnist_reads_raw_idx_files(tmp_path):
    arrays = _write_mnist(tmp_path)
    split = load_mnist(data_dir=tmp_path)
    assert split.x_train.shape == (6, 1, 28, 28) and split.x_train.dtype == torch.uint8
    assert split.x_test.shape == (4, 1, 28, 28)
    assert np.array_equal(split.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(split.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert split.y_train.tolist() == [0, 1, 2, 3, 4, 5]
    assert split.y_test.tolist() == [0, 3, 6, 9]
    assert split.y_train.dtype == torch.int64 and split.n_classes == 10


def test_mnist_missing_names_directory_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_mnist(data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "dataset.source.download=true" in message


def test_mnist_partial_files_lists_only_missing(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_mnist(data_dir=tmp_path)
    assert "train-images-idx3-ubyte" not in str(info.value)


def test_mnist_failed_download_is_one_line(tmp_path, monkeypatch):
    # A mirror that cannot be reached, without touching the network.
    monkeypatch.setattr(datasets.MNIST, "mirrors", [(tmp_path / "nowhere").as_uri() + "/"])
    with pytest.raises(DataNotFoundError, match="could not download MNIST") as info:
        load_mnist(data_dir=tmp_path, download=True)
    assert "\n" not in str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)


def test_mnist_download_skipped_when_files_present(tmp_path, monkeypatch):
    _write_mnist(tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("should not download")

    monkeypatch.setattr(datasets.MNIST, "download", fail)
    assert load_mnist(data_dir=tmp_path, download=True).x_train.shape[0] == 6


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images_with_labels(labels: list[int]) -> np.ndarray:
    """Rows of 3072 bytes (R plane, G plane, B plane) whose red plane encodes the label."""
    rows = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    rows[:, 0] = np.asarray(labels, dtype=np.uint8)[:, None, None]
    rows[:, 2, 0, 0] = 200  # blue top-left pixel: checks the channel/row-major order
    return rows.reshape(len(labels), 3072)


def _write_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(3)]
        _pickle(folder / f"data_batch_{i}", {"data": _images_with_labels(labels), "labels": labels})
    _pickle(folder / "test_batch", {"data": _images_with_labels([7, 8]), "labels": [7, 8]})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def _write_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = [0, 55, 99, 42]
    _pickle(
        folder / "train",
        {"data": _images_with_labels(train), "fine_labels": train, "coarse_labels": [0] * 4},
    )
    _pickle(
        folder / "test",
        {"data": _images_with_labels([99, 1]), "fine_labels": [99, 1], "coarse_labels": [0, 0]},
    )
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})


def test_cifar10_loads_pickled_batches(tmp_path):
    _write_cifar10(tmp_path)
    split = load_cifar10(data_dir=tmp_path, verify_md5=False)
    assert split.x_train.shape == (15, 3, 32, 32) and split.x_train.dtype == torch.uint8
    assert split.x_test.shape == (2, 3, 32, 32)
    assert split.n_classes == 10
    expected = [(i + j) % 10 for i in range(1, 6) for j in range(3)]
    assert split.y_train.tolist() == expected and split.y_train.dtype == torch.int64
    assert split.y_test.tolist() == [7, 8]
    # Channel 0 encodes the label, so images stayed paired with their labels and in CHW order.
    assert torch.equal(split.x_train[:, 0, 5, 5].long(), split.y_train)
    assert split.x_train[:, 2, 0, 0].eq(200).all() and split.x_train[:, 2, 0, 1].eq(0).all()


def test_cifar100_loads_fine_labels(tmp_path):
    _write_cifar100(tmp_path)
    split = load_cifar100(data_dir=tmp_path, verify_md5=False)
    assert split.n_classes == 100
    assert split.y_train.tolist() == [0, 55, 99, 42]
    assert split.y_test.tolist() == [99, 1]
    assert split.x_train.shape == (4, 3, 32, 32)
    assert torch.equal(split.x_test[:, 0, 31, 31].long(), split.y_test)


def test_cifar_checksums_are_verified_by_default(tmp_path):
    # Hand-made files cannot match the official md5s, which is exactly what must be caught.
    _write_cifar10(tmp_path)
    with pytest.raises(DataNotFoundError, match="corrupted") as info:
        load_cifar10(data_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert "data_batch_1" in str(info.value)


def test_cifar_matching_checksums_pass(tmp_path, monkeypatch):
    # Pretend the fixture files are the official ones: the md5 check must then accept them.
    _write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name):
        return hashlib.md5((folder / name).read_bytes(), usedforsecurity=False).hexdigest()

    cls = datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5("batches.meta")})
    assert load_cifar10(data_dir=tmp_path).x_train.shape == (15, 3, 32, 32)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes() + b"x")
    with pytest.raises(DataNotFoundError, match="test_batch is corrupted"):
        load_cifar10(data_dir=tmp_path)


def test_cifar_missing_names_directory(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_cifar100(data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message
    assert "dataset.source.download=true" in message
    assert "\n" not in message


def test_cifar_missing_single_file(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(DataNotFoundError, match="batches.meta"):
        load_cifar10(data_dir=tmp_path, verify_md5=False)


def test_cifar_failed_download_is_data_not_found(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise URLError("no network")

    monkeypatch.setattr(sources, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match="could not download CIFAR-10") as info:
        load_cifar10(data_dir=tmp_path, download=True)
    assert calls == [datasets.CIFAR10.url]
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# TinyImageNet
# ------------------------------------------------------------------------------------------

WNIDS = ["n01443537", "n01629819", "n02124075"]  # deliberately not written in sorted order below


def _tiny_image(path: Path, label: int, gray: bool = False) -> None:
    # A flat colour per class survives JPEG compression closely enough to recover the label.
    value = 40 * (label + 1)
    if gray:
        Image.new("L", (64, 64), value).save(path, "JPEG")
    else:
        Image.new("RGB", (64, 64), (value, value, 255 - value)).save(path, "JPEG")


def _write_tiny(root: Path, val_layout: str, with_wnids: bool = True) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    if with_wnids:
        (folder / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")
    for label, wnid in enumerate(WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            _tiny_image(images / f"{wnid}_{i}.JPEG", label, gray=(i == 0))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val = folder / "val"
    if val_layout == "official":
        (val / "images").mkdir(parents=True)
        lines = []
        for k, label in enumerate([2, 0, 1, 2]):
            _tiny_image(val / "images" / f"val_{k}.JPEG", label)
            lines.append(f"val_{k}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
        (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    else:
        for label, wnid in enumerate(WNIDS):
            target = val / wnid / "images" if val_layout == "nested" else val / wnid
            target.mkdir(parents=True)
            for k in range(label + 1):  # 1, 2, 3 images: counts identify the classes
                _tiny_image(target / f"val_{wnid}_{k}.JPEG", label)
    return folder


def _label_from_pixels(x: torch.Tensor) -> torch.Tensor:
    return (x[:, 0].float().mean(dim=(1, 2)) / 40).round().long() - 1


@pytest.mark.parametrize("with_wnids", [True, False])
def test_tinyimagenet_official_layout(tmp_path, with_wnids):
    _write_tiny(tmp_path, "official", with_wnids=with_wnids)
    split = load_tinyimagenet(data_dir=tmp_path)
    assert split.n_classes == 3
    assert split.x_train.shape == (9, 3, 64, 64) and split.x_train.dtype == torch.uint8
    assert split.x_test.shape == (4, 3, 64, 64)
    assert split.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert split.y_test.tolist() == [2, 0, 1, 2]
    assert torch.equal(_label_from_pixels(split.x_train), split.y_train)
    assert torch.equal(_label_from_pixels(split.x_test), split.y_test)
    # Grayscale images were expanded to three equal channels.
    assert torch.equal(split.x_train[0, 0], split.x_train[0, 2])


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_tinyimagenet_reorganised_val_layouts(tmp_path, layout):
    _write_tiny(tmp_path, layout)
    split = load_tinyimagenet(data_dir=tmp_path)
    assert split.y_test.tolist() == [0, 1, 1, 2, 2, 2]
    assert torch.equal(_label_from_pixels(split.x_test), split.y_test)


def test_tinyimagenet_cache_is_written_and_reused(tmp_path):
    folder = _write_tiny(tmp_path, "official")
    first = load_tinyimagenet(data_dir=tmp_path)
    cache = folder / TINYIMAGENET_CACHE
    assert cache.is_file()
    # A corrupt cache is rebuilt from the images rather than crashing.
    cache.write_bytes(b"not a torch file")
    rebuilt = load_tinyimagenet(data_dir=tmp_path)
    assert torch.equal(first.x_train, rebuilt.x_train)
    # With the JPEGs gone, only the (rewritten) cache can provide the data.
    for jpeg in folder.rglob("*.JPEG"):
        jpeg.unlink()
    second = load_tinyimagenet(data_dir=tmp_path)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.x_test, second.x_test)
    assert torch.equal(first.y_train, second.y_train) and torch.equal(first.y_test, second.y_test)
    assert second.n_classes == 3


def test_tinyimagenet_missing_val_image(tmp_path):
    folder = _write_tiny(tmp_path, "official")
    (folder / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DataNotFoundError, match="val_1.JPEG"):
        load_tinyimagenet(data_dir=tmp_path)


def test_tinyimagenet_missing_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_tinyimagenet(data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "tiny-imagenet-200" in str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# MER / La-MAML preprocessed files
# ------------------------------------------------------------------------------------------


def _mer_pair(n_tasks: int = 3, n_train: int = 8, n_test: int = 5):
    gen = torch.Generator().manual_seed(0)

    def task(param, n):
        return [param, torch.rand(n, 784, generator=gen), torch.arange(n) % 10]

    return (
        [task(10.0 * t, n_train) for t in range(n_tasks)],
        [task(10.0 * t, n_test) for t in range(n_tasks)],
    )


def test_mer_file_is_loaded(tmp_path):
    train, test = _mer_pair()
    torch.save((train, test), tmp_path / "mnist_rotations.pt")
    mer = load_mer(data_dir=tmp_path, scenario="mnist_rotations")
    assert mer.params == [0.0, 10.0, 20.0]
    assert len(mer.train) == len(mer.test) == 3
    x, y = mer.train[1]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x.flatten(1), train[1][1]) and y.dtype == torch.int64
    assert mer.test[2][0].shape == (5, 1, 28, 28)


def test_mer_list_pair_and_permutation_params(tmp_path):
    perms = [torch.randperm(784) for _ in range(2)]
    train = [[p, torch.rand(4, 784), torch.zeros(4, dtype=torch.long)] for p in perms]
    test = [[p, torch.rand(2, 784), torch.ones(2, dtype=torch.long)] for p in perms]
    torch.save([train, test], tmp_path / MER_FILES["mnist_many_permutations"])
    mer = load_mer(data_dir=tmp_path, scenario="mnist_many_permutations")
    assert all(torch.equal(a, b) for a, b in zip(mer.params, perms, strict=True))


def test_mer_file_with_numpy_params_loads(tmp_path):
    # Old preprocessing scripts may store numpy scalars, which torch's safe loader refuses.
    train, test = _mer_pair(n_tasks=2)
    for task in train + test:
        task[0] = np.float64(task[0])
    torch.save((train, test), tmp_path / "mnist_rotations.pt")
    mer = load_mer(data_dir=tmp_path, scenario="mnist_rotations")
    assert [float(p) for p in mer.params] == [0.0, 10.0]


def test_mer_missing_file_and_bad_scenario(tmp_path):
    with pytest.raises(DataNotFoundError, match="mnist_permutations.pt") as info:
        load_mer(data_dir=tmp_path, scenario="mnist_permutations")
    assert str(tmp_path / "mnist_permutations.pt") in str(info.value)
    with pytest.raises(ConfigError, match="unknown MER scenario 'mnist_spins'"):
        load_mer(data_dir=tmp_path, scenario="mnist_spins")


# ------------------------------------------------------------------------------------------
# Facts next to the loaders (what metacl.validate checks configs against)
# ------------------------------------------------------------------------------------------


def test_every_source_config_names_a_loader_whose_facts_match_its_data(tmp_path):
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from metacl.data.sources import SourceFacts, facts_of

    from .conftest import CONF

    for path in sorted((CONF / "dataset" / "source").glob("*.yaml")):
        node = OmegaConf.load(path)
        assert node._partial_ and isinstance(facts_of(get_object(node._target_)), SourceFacts)
    # The bundled digits are what their facts say, to the sample.
    split = load_bundled()
    facts = facts_of(load_bundled)
    assert (facts.classes, facts.train, facts.shape) == (split.n_classes, len(split.y_train),
                                                         tuple(split.x_train.shape[1:]))
    # The full sets: the same classes and image shape as files in their real format give.
    _write_mnist(tmp_path)
    _write_cifar10(tmp_path)
    _write_cifar100(tmp_path)
    for loader, options in ((load_mnist, {}), (load_cifar10, {"verify_md5": False}),
                            (load_cifar100, {"verify_md5": False}),
                            (sources.load_cifar10_100, {"verify_md5": False})):
        split = loader(data_dir=tmp_path, **options)
        facts = facts_of(loader)
        assert (facts.classes, facts.shape) == (split.n_classes, tuple(split.x_train.shape[1:]))

