from functools import partial

import torch

from metacl.data.datamodule import ContinualDataModule, random_crop_flip
from metacl.data.scenarios import class_split, mnist_rotations
from metacl.data.sources import load_bundled, load_cifar10


def _dm(**kwargs):
    args = {"source": load_bundled,
            "scenario": partial(mnist_rotations, n_tasks=3, samples_per_task=50, seed=0),
            "batch_size": 8, "seed": 0}
    return ContinualDataModule(**{**args, **kwargs}).build()


def test_one_epoch_streams_every_sample_of_the_task_once():
    dm = _dm()
    dm.set_task(1)
    # Batches come raw; Lightning runs on_after_batch_transfer (model input) before each step.
    xs, _ys, ts = zip(*(dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()))
    assert len(xs) == len(dm.train_dataloader()) == 7  # ceil(50 / 8)
    assert set(torch.cat(ts).tolist()) == {1}
    assert torch.cat(xs).dtype == torch.float32 and torch.cat(xs).max() <= 1.0
    stored = dm.tasks[1].x_train.float().div(255).flatten(1)
    seen = torch.cat(xs).flatten(1)
    # same multiset of images: sort rows by their sums
    assert torch.allclose(stored.sum(1).sort().values, seen.sum(1).sort().values)


def test_joint_streams_the_union_with_per_sample_task_ids():
    dm = _dm()
    dm.set_task(0, train_tasks=[0, 1, 2])
    ts = torch.cat([t for _, _, t in dm.train_dataloader()])
    assert torch.bincount(ts).tolist() == [50, 50, 50]


def test_task_info_for_domain_and_class_scenarios(tmp_path):
    info = _dm().task_info
    assert info.scenario == "domain" and not info.multi_head
    assert info.input_shape == (1, 28, 28) and info.n_outputs == 10 and info.n_tasks == 3

    from .fixtures import write_cifar

    write_cifar(tmp_path, n_classes=10, train_per_class=5, test_per_class=2)
    dm = ContinualDataModule(source=partial(load_cifar10, data_dir=tmp_path, verify_md5=False),
                             scenario=partial(class_split, n_tasks=5, classes_per_task=2),
                             n_tasks=5).build()
    info = dm.task_info
    assert info.multi_head and info.n_outputs == 10
    mask = info.class_mask()
    assert mask.sum(1).tolist() == [2] * 5 and mask.any(0).all()


def test_eval_loaders_cover_each_test_set_without_augmentation():
    dm = _dm(augment=True)
    loaders = dm.eval_dataloaders()
    assert len(loaders) == 3
    x, y, t = next(iter(loaders[2]))
    expected = dm.tasks[2].x_test[: len(y)].float() / 255
    assert torch.equal(x, expected) and set(t.tolist()) == {2}


def test_normalisation_uses_the_given_mean_and_std():
    dm = _dm(mean=[0.5], std=[0.25])
    x = dm.prepare_batch(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8), train=False)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_random_crop_flip_shifts_or_mirrors_each_image():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop_flip(x, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    # over many draws the crops differ (it is random)
    outs = {random_crop_flip(x, padding=2)[0].sum().item() for _ in range(20)}
    assert len(outs) > 1


def test_a_source_or_scenario_that_is_no_node_is_a_clear_error():
    import pytest

    from metacl.errors import ConfigError

    # What a retired string config (`dataset.source=bundled`) reaches the datamodule as.
    with pytest.raises(ConfigError, match="dataset.source='bundled' is not a source config"):
        _dm(source="bundled")
    with pytest.raises(ConfigError, match="dataset.scenario='class_split' is not a scenario"):
        _dm(scenario="class_split")
