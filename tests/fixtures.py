"""Small datasets written in the real on-disk formats, for end-to-end runs without downloads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, n_classes: int = 10, train_per_class: int = 20,
                test_per_class: int = 10, seed: int = 0) -> Path:
    """A learnable CIFAR-10/100 lookalike in torchvision's python-pickle layout.

    Each class has its own mean colour pattern plus noise, so methods can learn it in a few
    steps. n_classes=10 writes cifar-10-batches-py/, 100 writes cifar-100-python/.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(n_classes, 3, 32, 32))

    def images(labels):
        noise = rng.normal(0, 40, size=(len(labels), 3, 32, 32))
        x = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        return x.reshape(len(labels), 3072)

    train = np.repeat(np.arange(n_classes), train_per_class)
    test = np.repeat(np.arange(n_classes), test_per_class)
    rng.shuffle(train)

    def dump(path, obj):
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    if n_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i, chunk in enumerate(np.array_split(train, 5), start=1):
            dump(folder / f"data_batch_{i}", {"data": images(chunk), "labels": chunk.tolist()})
        dump(folder / "test_batch", {"data": images(test), "labels": test.tolist()})
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, labels in (("train", train), ("test", test)):
            dump(folder / name, {"data": images(labels), "fine_labels": labels.tolist(),
                                 "coarse_labels": [0] * len(labels)})
        dump(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    return root
