"""Episodic datamodule: sources in their real on-disk formats, episodes, fixed test episodes."""

from __future__ import annotations

import csv
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metacl.data.episodic import (
    OMNIGLOT_CACHE,
    Episodes,
    EpisodicDataModule,
    Sinusoid,
    load_digits_fewshot,
    load_miniimagenet,
    load_omniglot,
)
from metacl.data.sources import load_bundled
from metacl.errors import ConfigError, DataNotFoundError

DIGITS = partial(load_digits_fewshot)  # what conf/dataset/digits_fewshot.yaml's source gives

# ------------------------------------------------------------------------------------------
# Fixture writers: tiny datasets in the exact layouts the loaders read
# ------------------------------------------------------------------------------------------


def write_omniglot(root: Path, alphabets=(("Latin", 3), ("Greek", 3)),
                   evaluation=(("Tengwar", 2),), per_character: int = 20, seed: int = 0) -> Path:
    """torchvision's layout: omniglot-py/images_{background,evaluation}/<alphabet>/<char>/*.png.

    105x105 1-bit PNGs, black strokes on white like the real files; every character is a
    different random set of thick strokes, so images of one character resemble each other.
    """
    rng = np.random.default_rng(seed)
    label = 0
    for part, groups in (("images_background", alphabets), ("images_evaluation", evaluation)):
        for alphabet, n_chars in groups:
            for c in range(1, n_chars + 1):
                folder = root / "omniglot-py" / part / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                strokes = rng.integers(10, 95, size=(3, 2))
                for i in range(per_character):
                    img = np.full((105, 105), 255, dtype=np.uint8)
                    for y, x in strokes + rng.integers(-3, 4, size=strokes.shape):
                        img[y - 6 : y + 6, x - 20 : x + 20] = 0
                    Image.fromarray(img).convert("1").save(folder / f"{label:04d}_{i + 1:02d}.png")
                label += 1
    return root


def _mini_images(n_classes: int, per_class: int, seed: int, size=(84, 84)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n_classes, 1, 1, 3))
    noise = rng.integers(-20, 21, size=(n_classes, per_class, size[1], size[0], 3))
    return np.clip(colours[:, None] + noise, 0, 255).astype(np.uint8)


MINI_SPLITS = {"train": 4, "val": 3, "test": 3}  # classes per split in the fixtures


def write_miniimagenet_folder(root: Path, per_class: int = 6) -> Path:
    """Ravi & Larochelle's CSVs (filename,label) and images/ of JPEGs (not 84x84: resized)."""
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in MINI_SPLITS.items():
        images = _mini_images(n, per_class, seed=start, size=(90, 100))
        rows = []
        for c in range(n):
            wnid = f"n{start + c:08d}"
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                Image.fromarray(images[c, i]).save(folder / "images" / name, quality=95)
                rows.append((name, wnid))
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        start += n
    return root


def write_miniimagenet_pickles(root: Path, per_class: int = 6) -> Path:
    """The common pickle cache: {'image_data': (N, 84, 84, 3) uint8, 'class_dict': wnid->idx}."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, n in MINI_SPLITS.items():
        images = _mini_images(n, per_class, seed=start).reshape(n * per_class, 84, 84, 3)
        class_dict = {f"n{start + c:08d}": list(range(c * per_class, (c + 1) * per_class))
                      for c in range(n)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)
        start += n
    return root


@pytest.fixture(scope="module")
def digits_dm():
    return EpisodicDataModule(DIGITS, ways=5, shots=2, query=3,
                              val_episodes=4, test_episodes=6).build()


# ------------------------------------------------------------------------------------------
# digits_fewshot
# ------------------------------------------------------------------------------------------


def test_digits_classes_are_digit_rotations_split_by_class():
    source = load_digits_fewshot()
    parts = {s: {tuple(c) for c in cls.tolist()} for s, cls in source.split_classes.items()}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [24, 6, 10]
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"]
                or parts["val"] & parts["test"])
    assert set().union(*parts.values()) == {(d, k) for d in range(10) for k in range(4)}
    assert len(source.images) == 5000 and source.images.dtype == torch.uint8
    # The split does not depend on anything but the constant split seed.
    again = load_digits_fewshot()
    assert all(torch.equal(again.split_classes[s], source.split_classes[s]) for s in parts)


def test_episode_layout_and_relabelling(digits_dm):
    digits_dm.meta_batch_size = 3
    batch = next(iter(digits_dm.train_dataloader()))
    assert isinstance(batch, Episodes) and batch.n_tasks == 3
    assert batch.support_x.shape == (3, 10, 1, 28, 28)
    assert batch.query_x.shape == (3, 15, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32
    assert 0.0 <= float(batch.support_x.min()) and float(batch.support_x.max()) <= 1.0
    for t in range(3):
        assert torch.equal(torch.bincount(batch.support_y[t], minlength=5), torch.full((5,), 2))
        assert torch.equal(torch.bincount(batch.query_y[t], minlength=5), torch.full((5,), 3))
        # ways distinct meta-train classes behind the labels
        assert len(set(batch.classes[t].tolist())) == 5
        assert int(batch.classes[t].max()) < digits_dm.pools["train"].n_classes


def test_episode_images_are_the_class_digit_rotated():
    dm = EpisodicDataModule(DIGITS, ways=5, shots=1, query=2).build()
    pool = dm.pools["train"]
    gen = torch.Generator().manual_seed(3)
    cls, images = pool.draw(4, 5, 3, gen)
    episodes = pool.assemble(cls, images, shots=1)
    raw = load_bundled()
    labels = torch.cat([raw.y_train, raw.y_test])
    for e in range(4):
        for w in range(5):
            digit, turns = pool.classes[cls[e, w]].tolist()
            assert set(labels[images[e, w]].tolist()) == {digit}  # all images of that digit
            expected = torch.rot90(pool.images[images[e, w, 0]].float() / 255, turns, (-2, -1))
            got = episodes.support_x[e][episodes.support_y[e] == w][0]
            assert torch.allclose(got, expected)
    # Images of a class are distinct within an episode (drawn without replacement).
    for e in range(4):
        for w in range(5):
            assert len(set(images[e, w].tolist())) == 3


def test_fixed_test_episodes_depend_only_on_episode_seed():
    a = EpisodicDataModule(DIGITS, test_episodes=5, val_episodes=5, seed=1).build()
    b = EpisodicDataModule(DIGITS, test_episodes=5, val_episodes=5, seed=2).build()
    ta, tb = next(a.eval_episodes("test").batches(5)), next(b.eval_episodes("test").batches(5))
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    va = next(a.eval_episodes("val").batches(5))
    assert not torch.equal(va.classes, ta.classes)  # other split, other classes
    # Meta-training episodes follow the run seed.
    assert not torch.equal(a.draw_train(2).support_x, b.draw_train(2).support_x)
    c = EpisodicDataModule(DIGITS, test_episodes=5, episode_seed=7).build()
    assert not torch.equal(next(c.eval_episodes("test").batches(5)).query_x, ta.query_x)
    # Batching does not change the episodes.
    chunks = list(a.eval_episodes("test").batches(2))
    assert [c.n_tasks for c in chunks] == [2, 2, 1]
    assert torch.equal(torch.cat([c.query_x for c in chunks]), ta.query_x)


def test_debug_limits_map_to_episodes():
    dm = EpisodicDataModule(DIGITS, meta_batches_per_epoch=500, test_episodes=600,
                            val_episodes=100, limit_tasks=2, limit_train_per_task=40,
                            limit_test_per_task=50).build()
    assert dm.meta_batches_per_epoch == 2 and len(dm.train_dataloader()) == 2
    assert len(dm.eval_episodes("test")) == 50 and len(dm.eval_episodes("val")) == 50
    assert int(dm.pools["train"].counts.max()) == 40
    with pytest.raises(ConfigError, match="limit_train_per_task"):
        EpisodicDataModule(DIGITS, shots=5, query=15, limit_train_per_task=10).build()


def test_invalid_configurations_are_one_clear_line():
    with pytest.raises(ConfigError, match="floppy"):
        EpisodicDataModule("floppy")
    with pytest.raises(ConfigError, match="not an episodic source"):
        EpisodicDataModule(partial(load_bundled))  # a continual source
    with pytest.raises(ConfigError, match="20-way"):
        EpisodicDataModule(DIGITS, ways=20).build()
    with pytest.raises(ConfigError, match="class_split"):
        EpisodicDataModule(partial(load_digits_fewshot, class_split=[20, 5, 5])).build()
    with pytest.raises(ConfigError, match="ways"):
        EpisodicDataModule(partial(Sinusoid), ways=5)


def test_train_ways_shape_only_meta_training_episodes():
    dm = EpisodicDataModule(DIGITS, ways=5, shots=1, query=2, train_ways=10,
                            train_shots=2, train_query=3, test_episodes=2).build()
    train = dm.draw_train(2)
    assert train.support_x.shape[1] == 20 and train.query_x.shape[1] == 30
    test = next(dm.eval_episodes("test").batches(2))
    assert test.support_x.shape[1] == 5 and test.query_x.shape[1] == 10
    info = dm.episode_info
    assert (info.ways, info.train_ways, info.n_outputs, info.n_train_classes) == (5, 10, 5, 24)


# ------------------------------------------------------------------------------------------
# Omniglot
# ------------------------------------------------------------------------------------------


def test_omniglot_from_torchvision_layout(tmp_path):
    root = write_omniglot(tmp_path / "data")
    source = load_omniglot(data_dir=root, class_split=(4, 1, 3))
    assert source.images.shape == (8 * 20, 1, 28, 28) and source.images.dtype == torch.uint8
    assert sorted(len(c) for c in source.split_classes.values()) == [4, 12, 16]  # x4 rotations
    # Characters are split whole: all four rotations of one character in one split.
    chars = {s: set(c[:, 0].tolist()) for s, c in source.split_classes.items()}
    assert not (chars["train"] & chars["test"] or chars["train"] & chars["val"])
    assert (root / "omniglot-py" / OMNIGLOT_CACHE).is_file()
    cached = load_omniglot(data_dir=root, class_split=(4, 1, 3))
    assert torch.equal(cached.images, source.images)

    dm = EpisodicDataModule(partial(load_omniglot, data_dir=root, class_split=[4, 1, 3]),
                            ways=3, shots=1, query=2, val_episodes=0, test_episodes=4).build()
    episodes = next(dm.eval_episodes("test").batches(4))
    assert episodes.support_x.shape == (4, 3, 1, 28, 28)
    # Inverted as the reference: the white background becomes 0, strokes near 1.
    x = episodes.query_x
    assert float((x < 0.5).float().mean()) > 0.5 and float(x.max()) > 0.9


def test_omniglot_rotations_off_and_bad_split(tmp_path):
    root = write_omniglot(tmp_path / "data", per_character=4)
    source = load_omniglot(data_dir=root, class_split=(6, 1, 1), rotations=False)
    assert sorted(len(c) for c in source.split_classes.values()) == [1, 1, 6]
    with pytest.raises(ConfigError, match="8 characters"):
        load_omniglot(data_dir=root)  # the default 1100/100/423 needs 1623 characters


def test_omniglot_missing_is_one_line(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_omniglot(data_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "images_background" in message and "omniglot-py" in message


# ------------------------------------------------------------------------------------------
# miniImageNet
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "pickle"])
def test_miniimagenet_layouts(tmp_path, layout):
    writer = write_miniimagenet_folder if layout == "folder" else write_miniimagenet_pickles
    root = writer(tmp_path / "data")
    source = load_miniimagenet(data_dir=root)
    assert source.images.shape == (10 * 6, 3, 84, 84) and source.images.dtype == torch.uint8
    assert {s: len(c) for s, c in source.split_classes.items()} == MINI_SPLITS
    # Every image of a class has that class's colour (labels follow the split files).
    means = source.images.float().mean(dim=(2, 3))
    for c in range(10):
        members = means[source.labels == c]
        assert len(members) == 6 and float((members - members.mean(0)).abs().max()) < 12
    dm = EpisodicDataModule(partial(load_miniimagenet, data_dir=root), ways=3, shots=1, query=2,
                            val_episodes=2, test_episodes=3).build()
    test = next(dm.eval_episodes("test").batches(3))
    assert test.support_x.shape == (3, 3, 3, 84, 84)
    assert dm.episode_info.input_shape == (3, 84, 84)


def test_miniimagenet_missing_names_both_layouts(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_miniimagenet(data_dir=tmp_path)
    assert "mini-imagenet-cache-train.pkl" in str(err.value) and "train.csv" in str(err.value)


# ------------------------------------------------------------------------------------------
# Sinusoid
# ------------------------------------------------------------------------------------------


def test_sinusoid_tasks():
    dm = EpisodicDataModule(partial(Sinusoid, amplitude=[0.1, 5.0], phase=[0.0, np.pi],
                                    x_range=[-5.0, 5.0]),
                            ways=1, shots=10, query=5, test_episodes=20).build()
    info = dm.episode_info
    assert (info.task, info.input_shape, info.n_outputs) == ("regression", (1,), 1)
    test = next(dm.eval_episodes("test").batches(20))
    assert test.support_x.shape == (20, 10, 1) and test.query_y.shape == (20, 5, 1)
    assert float(test.support_x.abs().max()) <= 5.0 and float(test.query_y.abs().max()) <= 5.0
    # Support and query points come from one function A sin(x - phase) = a sin x + b cos x.
    for t in range(20):
        basis = lambda x: torch.cat([torch.sin(x), torch.cos(x)], 1).double()
        coef = torch.linalg.lstsq(basis(test.support_x[t]), test.support_y[t].double()).solution
        assert torch.allclose(basis(test.query_x[t]) @ coef, test.query_y[t].double(), atol=1e-4)
        amplitude = float(coef.norm())
        assert 0.1 - 1e-4 <= amplitude <= 5.0 + 1e-4
    train = dm.draw_train(3)
    assert train.support_x.shape == (3, 10, 1) and train.classes.shape == (3, 0)
