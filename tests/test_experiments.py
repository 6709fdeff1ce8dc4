"""Every `conf/experiment/**` file runs as `python train.py experiment=<name>`: composed with
`debug=fast` (and tinier limits), on small lookalike data sets written in the real on-disk
formats, it must end `completed` (issue 17: HAT's files used to train La-MAML and diverge).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacl.runner.main import main as run_main

from .conftest import CONF
from .fixtures import write_cifar
from .test_episodic_data import write_omniglot
from .test_sources import _write_mnist

EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix(""))
                     for p in (CONF / "experiment").rglob("*.yaml"))

# A few evaluation samples/episodes: the point is that the file runs.
TINY = ["debug=fast", "dataset.limit_test_per_task=2"]
# Per source: continual streams get one small batch per task, episodic ones one meta-batch;
# the lookalike CIFAR files have their own checksums; Omniglot's has far fewer characters than
# the real 1623 (1100/100/423); episodic sources keep 20 images per class (shots + queries).
CONTINUAL = ["dataset.limit_train_per_task=5"]
# One meta-batch; 2 query samples per class (evaluation adapts on each episode for up to 10
# steps: with the files' 15 queries the 84x84 miniImageNet runs took 25 s each).
EPISODIC = ["dataset.limit_tasks=1", "dataset.query=2", "dataset.train_query=2"]
CIFAR = [*CONTINUAL, "dataset.source.verify_md5=false"]
# Keyed by the source's loader (`_target_` metacl.data.<module>.load_<name>, Sinusoid).
DATA_OVERRIDES = {"cifar10": CIFAR, "cifar100": CIFAR, "cifar10_100": CIFAR,
                  "bundled": CONTINUAL, "mnist": CONTINUAL, "tinyimagenet": CONTINUAL,
                  "omniglot": [*EPISODIC, "dataset.source.class_split=[5,5,5]"],
                  "miniimagenet": EPISODIC, "digits_fewshot": EPISODIC, "sinusoid": EPISODIC,
                  "Sinusoid": EPISODIC}


def _source_name(cfg) -> str:
    return str(cfg.dataset.source._target_).rsplit(".", 1)[-1].removeprefix("load_")


def _write_tinyimagenet(root: Path, n_classes: int = 200, per_class: int = 10) -> None:
    """tiny-imagenet-200/ as unzipped: wnids.txt, train/<wnid>/images/*.JPEG and
    val/images + val_annotations.txt; a flat colour per class."""
    folder = root / "tiny-imagenet-200"
    wnids = [f"n{c:08d}" for c in range(n_classes)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for label, wnid in enumerate(wnids):
        colour = (label % 256, (7 * label) % 256, 255 - label % 256)
        image = Image.new("RGB", (64, 64), colour)
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            image.save(images / f"{wnid}_{i}.JPEG", "JPEG")
        image.save(folder / "val" / "images" / f"val_{label}.JPEG", "JPEG")
        lines.append(f"val_{label}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def _write_miniimagenet(root: Path, per_class: int = 20) -> None:
    """The pickle cache with 6 classes per split (5-way episodes need 5)."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        colours = rng.integers(0, 256, size=(6, 1, 1, 1, 3))
        images = np.broadcast_to(colours, (6, per_class, 84, 84, 3)).astype(np.uint8)
        class_dict = {f"n{split}{c:05d}": list(range(c * per_class, (c + 1) * per_class))
                      for c in range(6)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images.reshape(-1, 84, 84, 3), "class_dict": class_dict},
                        f)


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory) -> Path:
    """One data_dir with every source the experiment files read."""
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, n_classes=10, train_per_class=10, test_per_class=2)
    write_cifar(root, n_classes=100, train_per_class=10, test_per_class=2, seed=1)
    _write_mnist(root, n_train=200, n_test=50)
    _write_tinyimagenet(root)
    write_omniglot(root, alphabets=(("Latin", 10),), evaluation=(("Tengwar", 5),))
    _write_miniimagenet(root)
    return root


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_runs_to_completed(compose, lookalike, tmp_path, name):
    cfg = compose([f"experiment={name}", *TINY, f"data_dir={lookalike}",
                   f"paths.output_dir={tmp_path}"])
    cfg = compose([f"experiment={name}", *TINY, f"data_dir={lookalike}",
                   f"paths.output_dir={tmp_path}",
                   *DATA_OVERRIDES.get(_source_name(cfg), [])])
    run_main(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "completed", results.get("error")
