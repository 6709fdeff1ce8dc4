"""No file the project reads is unpickled unsafely (issue 17, item 7).

Every loader that reads a pickle or a ``.pt`` file gets a crafted file whose unpickling would
create a marker file: it must be refused (or, for a cache we wrote ourselves, ignored and
rebuilt) and the marker must not exist afterwards. The same loaders still read the real
on-disk formats, including Python 2 pickles (CIFAR's) and legacy (non-zip) torch files (MER's).
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from metacl import checkpoint
from metacl.data import episodic
from metacl.data.safe_load import UnsafeFileError, load_pickle
from metacl.data.sources import (
    MER_FILES,
    TINYIMAGENET_CACHE,
    load_cifar10,
    load_cifar10_100,
    load_cifar100,
    load_mer,
    load_mnist,
    load_tinyimagenet,
)
from metacl.errors import ConfigError, DataNotFoundError

from .test_episodic_data import write_miniimagenet_pickles
from .test_sources import (
    _images_with_labels,
    _mer_pair,
    _write_cifar10,
    _write_cifar100,
    _write_tiny,
)


class SystemCall:
    """Unpickling this runs a shell command (os.system) that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesFile:
    """Unpickling this calls builtins.exec, which writes `marker` from Python."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


PAYLOADS = [SystemCall, WritesFile]


@pytest.fixture(params=PAYLOADS, ids=lambda p: p.__name__)
def payload(request, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    yield request.param(marker), marker
    assert not marker.exists(), "the crafted file's code ran"


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_the_payloads_do_run_under_a_plain_unpickler(tmp_path):
    # Guards the tests below: a refusal only means something if the file really is malicious.
    for kind in PAYLOADS:
        marker = tmp_path / f"ran_{kind.__name__}"
        pickle.loads(pickle.dumps(kind(marker)))
        assert marker.exists()


# ------------------------------------------------------------------------------------------
# MER / La-MAML .pt files: torch.load(weights_only=True), no fallback
# ------------------------------------------------------------------------------------------

def _save(obj, path: Path, fmt: str) -> None:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":  # what torch < 1.6 wrote, as the distributed MER files are
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle renamed .pt
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain pickle"])
def test_crafted_mer_file_is_refused_and_its_code_never_runs(tmp_path, payload, fmt):
    evil, _ = payload
    train, test = _mer_pair(n_tasks=2)
    train[1][0] = evil  # hidden where a rotation angle belongs
    _save((train, test), tmp_path / "mnist_rotations.pt", fmt)
    with pytest.raises(UnsafeFileError) as info:
        load_mer(data_dir=tmp_path, scenario="mnist_rotations")
    message = _one_line(info.value)
    assert str(tmp_path / "mnist_rotations.pt") in message and "refusing to load" in message
    if fmt != "plain pickle":  # (torch's safe loader stops a bare pickle at its first opcode)
        assert "system" in message or "exec" in message  # says what it tried to import
    assert isinstance(info.value, DataNotFoundError)  # so the CLI prints one line, exit 2


def test_mer_files_in_the_distributed_format_load(tmp_path):
    """Legacy (pre-zip) torch files, float angles for rotations and the string
    'random permutation' for permutations (GEM's mnist_*.py scripts)."""
    train, test = _mer_pair(n_tasks=2)
    _save((train, test), tmp_path / "mnist_rotations.pt", "legacy")
    mer = load_mer(data_dir=tmp_path, scenario="mnist_rotations")
    assert mer.params == [0.0, 10.0] and mer.train[1][0].shape == (8, 1, 28, 28)

    perm = [["random permutation", torch.rand(3, 784), torch.arange(3)] for _ in range(2)]
    _save([perm, perm], tmp_path / MER_FILES["mnist_permutations"], "legacy")
    mer = load_mer(data_dir=tmp_path, scenario="mnist_permutations")
    assert mer.params == ["random permutation"] * 2


def test_a_type_outside_the_allow_list_is_refused_even_if_harmless(tmp_path):
    train, test = _mer_pair(n_tasks=1)
    train[0][0] = np.array([1.0, 2.0])  # a numpy array: not in the MER files, not allowed
    torch.save((train, test), tmp_path / "mnist_rotations.pt")
    with pytest.raises(UnsafeFileError, match="mnist_rotations.pt"):
        load_mer(data_dir=tmp_path, scenario="mnist_rotations")


# ------------------------------------------------------------------------------------------
# CIFAR python pickles: restricted unpickler
# ------------------------------------------------------------------------------------------

CIFAR_CASES = [  # (writer, loader, file to replace)
    (_write_cifar10, load_cifar10, "cifar-10-batches-py/data_batch_3"),
    (_write_cifar10, load_cifar10, "cifar-10-batches-py/test_batch"),
    (_write_cifar10, load_cifar10, "cifar-10-batches-py/batches.meta"),
    (_write_cifar100, load_cifar100, "cifar-100-python/train"),
    (_write_cifar100, load_cifar100, "cifar-100-python/meta"),
]


@pytest.mark.parametrize("write, load, name", CIFAR_CASES,
                         ids=[c[2].replace("/", ":") for c in CIFAR_CASES])
@pytest.mark.parametrize("hidden", [False, True], ids=["whole file", "inside the dict"])
def test_crafted_cifar_pickle_is_refused_and_its_code_never_runs(tmp_path, payload, write,
                                                                  load, name, hidden):
    evil, _ = payload
    write(tmp_path)
    obj = {"data": _images_with_labels([1, 2]), "labels": [1, 2], "extra": evil} if hidden \
        else evil
    with open(tmp_path / name, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(UnsafeFileError) as info:
        load(data_dir=tmp_path, verify_md5=False)
    message = _one_line(info.value)
    assert str(tmp_path / name) in message and "refusing to load" in message


def test_crafted_cifar_pickle_is_refused_through_the_registry(tmp_path, payload):
    evil, _ = payload
    _write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump(evil, f)
    with pytest.raises(UnsafeFileError, match="data_batch_1"):
        load_cifar10_100(data_dir=tmp_path, verify_md5=False)


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR: protocol 2, byte strings (and str)
    as Python 2 `str` opcodes, numpy's module named numpy.core."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):  # numpy 1.x, as in 2009-2019, had numpy.core
            self.write(pickle.GLOBAL + f"{module.replace('_core', 'core')}\n"
                       f"{name or obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[type] = save_global


def _python2_dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)


def test_cifar_in_python2_format_loads_like_the_python3_fixtures(tmp_path):
    _write_cifar10(tmp_path / "py3")
    py2 = tmp_path / "py2" / "cifar-10-batches-py"
    py2.mkdir(parents=True)
    for f in (tmp_path / "py3" / "cifar-10-batches-py").iterdir():
        with open(f, "rb") as src:
            _python2_dump(py2 / f.name, pickle.load(src))
    raw = (py2 / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02") and b"cnumpy.core.multiarray\n_reconstruct" in raw
    assert b"_codecs" not in raw  # bytes really are Python 2 str opcodes
    a = load_cifar10(data_dir=tmp_path / "py3", verify_md5=False)
    b = load_cifar10(data_dir=tmp_path / "py2", verify_md5=False)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.x_test, b.x_test) and a.n_classes == b.n_classes == 10


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, labels in (("train", [3, 4, 5]), ("test", [6])):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": _images_with_labels(labels), "fine_labels": labels,
                         "coarse_labels": np.zeros(len(labels), dtype=np.int64).tolist(),
                         "filenames": [b"x.png"] * len(labels)}, f, protocol=protocol)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f, protocol=protocol)
    split = load_cifar100(data_dir=tmp_path, verify_md5=False)
    assert split.y_train.tolist() == [3, 4, 5] and split.x_test.shape == (1, 3, 32, 32)


def test_restricted_unpickler_accepts_numpy_scalars_and_refuses_the_rest(tmp_path):
    path = tmp_path / "f.pkl"
    path.write_bytes(pickle.dumps({"i": np.int64(3), "x": np.float32(0.5), "l": [1, "a", b"b"]}))
    assert load_pickle(path, "test")["i"] == 3
    for refused in (Path("x"), complex(1, 2), np.random.default_rng(0)):
        path.write_bytes(pickle.dumps(refused))
        with pytest.raises(UnsafeFileError, match="refusing to load"):
            load_pickle(path, "test")


# ------------------------------------------------------------------------------------------
# miniImageNet pickle cache
# ------------------------------------------------------------------------------------------

def test_crafted_miniimagenet_pickle_is_refused_and_its_code_never_runs(tmp_path, payload):
    evil, _ = payload
    write_miniimagenet_pickles(tmp_path, per_class=2)
    path = tmp_path / "miniimagenet" / "mini-imagenet-cache-val.pkl"
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["class_dict"]["n99999999"] = evil
    with open(path, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(UnsafeFileError) as info:
        episodic.load_miniimagenet(data_dir=tmp_path)
    assert str(path) in _one_line(info.value)


def test_real_miniimagenet_pickles_still_load(tmp_path):
    write_miniimagenet_pickles(tmp_path, per_class=2)
    source = episodic.load_miniimagenet(data_dir=tmp_path)
    assert source.images.shape[1:] == (3, 84, 84) and source.images.dtype == torch.uint8


# ------------------------------------------------------------------------------------------
# Caches we write ourselves (TinyImageNet, Omniglot, miniImageNet CSVs) and checkpoints
# ------------------------------------------------------------------------------------------

def test_crafted_tinyimagenet_cache_is_ignored_and_rebuilt(tmp_path, payload):
    evil, _ = payload
    cache = _write_tiny(tmp_path, "official") / TINYIMAGENET_CACHE
    torch.save({"version": 1, "x_train": evil}, cache)
    split = load_tinyimagenet(data_dir=tmp_path)
    assert split.n_classes == 3 and split.x_train.dtype == torch.uint8
    assert torch.load(cache, weights_only=True)["version"] == 1  # rebuilt, now clean


def test_crafted_episodic_cache_is_ignored(tmp_path, payload):
    evil, _ = payload
    cache = tmp_path / "metacl_cache_84.pt"
    torch.save({"version": 1, "images": evil}, cache)
    assert episodic._read_cache(cache, {"version": 1}) is None


def test_crafted_checkpoint_is_refused(tmp_path, payload):
    evil, _ = payload
    path = tmp_path / "last.ckpt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "method": evil}, path)
    with pytest.raises(ConfigError, match="cannot be read"):
        checkpoint.load(path)


def test_crafted_legacy_mnist_cache_is_refused(tmp_path, payload):
    # torchvision prefers MNIST/processed/{training,test}.pt (torch.load, weights_only=True)
    evil, _ = payload
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    torch.save((evil, torch.zeros(2, dtype=torch.long)), processed / "training.pt")
    torch.save((torch.zeros(2, 28, 28, dtype=torch.uint8), torch.zeros(2)), processed / "test.pt")
    with pytest.raises(UnsafeFileError) as info:
        load_mnist(data_dir=tmp_path)
    assert str(processed / "training.pt") in _one_line(info.value)
