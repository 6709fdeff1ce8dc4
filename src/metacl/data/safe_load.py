"""Reading pickled data files without running code a crafted file might carry.

A pickle can name any importable callable (``os.system``, ``subprocess.Popen``...) and the plain
``pickle.load`` / ``torch.load(weights_only=False)`` calls it while reading. Dataset files come
from the internet and shared folders, so every pickle the project reads goes through one of two
doors, each accepting only the types the real files hold, and neither has an unsafe fallback:

- ``load_pickle``: a ``pickle.Unpickler`` whose ``find_class`` knows only numpy's array and
  scalar reconstruction (CIFAR's python batches, the miniImageNet pickle cache). Everything else
  in those files is dicts, lists, strings, bytes and ints, which pickle builds without imports.
- ``load_torch``: ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings) plus
  numpy's numeric scalars (old MER/La-MAML preprocessing scripts stored angles as ``np.float64``).

A refused file raises ``UnsafeFileError``: one line naming the file and what it tried to import.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metacl.errors import DataNotFoundError


class UnsafeFileError(DataNotFoundError):
    """A data file names a type the real files never hold: refused before anything runs."""


def _numpy_core():
    try:  # numpy >= 2 (numpy 1.26 has the alias too); older numpy only has numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 1.26
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _pickle_allow_list() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): __import__("codecs").encode,  # bytes in protocol-2 pickles
    }
    # Pickles written by numpy 1.x name numpy.core, by numpy 2.x numpy._core: the same functions.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # array
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # np.int64(3) etc.
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5 array
    return allowed


_PICKLE_ALLOWED = _pickle_allow_list()


class _DataUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain Python containers; refuses every other import."""

    def __init__(self, file, path: Path, what: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (CIFAR's) hold latin-1 str
        self._path, self._what = path, what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"refusing to load {self._path}: it imports {module}.{name}, which {self._what} "
                "files never hold (a file crafted to run code does); replace it with the original"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"refusing to load {self._path}: it holds a persistent reference, "
                              f"which {self._what} files never hold; replace it with the original")


def load_pickle(path: Path, what: str) -> Any:
    """Unpickle a data file, accepting only numpy arrays/scalars and plain Python values.

    ``what`` names the dataset in the error line. A refused file raises ``UnsafeFileError``;
    a truncated or foreign one raises what pickle raises (``UnpicklingError``, ``EOFError``...),
    for the caller to report as corrupt.
    """
    with open(path, "rb") as f:
        return _DataUnpickler(f, Path(path), what).load()


def _numpy_scalar_globals() -> list[Any]:
    multiarray, _ = _numpy_core()
    # np.float64(...) pickles as scalar(dtype('f8'), bytes); torch also wants the dtype's class.
    dtype_classes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefd"}
    return [multiarray.scalar, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def weights_only_refusal(exc: BaseException) -> str | None:
    """What torch's weights_only loader refused, in a few words; None if the file was not
    refused but is simply not a readable pickle (a corrupt file)."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    imported = re.search(r"GLOBAL ([\w.]+)", text)
    if imported:
        return f"it imports {imported.group(1)}"
    built = re.search(r"but got (<class '[\w.]+'>)", text)
    if built:
        return f"it builds {built.group(1)}"
    detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
    detail = " ".join(detail.split())[:120]
    return f"it holds what the safe loader refuses ({detail})" if detail else \
        "it holds what the safe loader refuses"


def load_torch(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with numpy's numeric scalars allowed.

    A refused file raises ``UnsafeFileError`` (never a retry without ``weights_only``); a
    truncated or foreign file raises what torch raises (``RuntimeError``, ``EOFError``,
    ``UnpicklingError``...), for the caller to report as corrupt.
    """
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = weights_only_refusal(exc)
        if reason is None:
            raise
        raise UnsafeFileError(
            f"refusing to load {path}: {reason}, but {what} files hold only "
            "tensors, numbers and strings (a file crafted to run code does not); replace it "
            "with the original"
        ) from None
