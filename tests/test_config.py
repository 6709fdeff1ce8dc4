"""Every option of every config group composes and instantiates."""

import pytest
import pytorch_lightning as pl
from hydra.utils import get_class, get_object, instantiate

from metacl.cli import nested_groups
from metacl.data.sources import facts_of
from metacl.models.backbones import MLP
from metacl.task_info import TaskInfo
from metacl.validate import validate_config

from .conftest import CONF


def options(group):
    """A group's options, without those of the groups nested in it (dataset/source)."""
    nested = nested_groups(CONF / group)
    return sorted(str(p.relative_to(CONF / group).with_suffix(""))
                  for p in (CONF / group).rglob("*.yaml")
                  if p.relative_to(CONF / group).parts[0] not in nested)


def _task_info(cfg):
    shape = facts_of(get_object(cfg.dataset.source._target_)).shape
    if "classes_per_task" in cfg.dataset.scenario:
        n_tasks = cfg.dataset.n_tasks
        per_task = cfg.dataset.scenario.classes_per_task or 2
        classes = tuple(tuple(range(u * per_task, (u + 1) * per_task)) for u in range(n_tasks))
        return TaskInfo(n_tasks, shape, n_tasks * per_task, classes, "class")
    return TaskInfo(cfg.dataset.n_tasks, shape, 10, ((*range(10),),) * cfg.dataset.n_tasks,
                    "domain")


def _episode_info(cfg):
    from metacl.data.episodic import EpisodeInfo

    source = cfg.dataset.get("source")
    shape = facts_of(get_object(source._target_)).shape if source else (1, 28, 28)
    return EpisodeInfo(task="classification", input_shape=shape, n_outputs=5, ways=5, shots=1,
                       query=15, train_ways=5, train_shots=1, train_query=15,
                       n_train_classes=20)


def _instantiate_all(cfg):
    dm = instantiate(cfg.dataset)  # building (loading data) is tested elsewhere
    method_class = get_class(cfg.method._target_)
    if getattr(dm, "protocol", "continual") != "continual":
        if getattr(method_class, "protocol", "continual") != dm.protocol:
            return None  # refused with one line by run.main (tests/test_run.py)
        info = _episode_info(cfg)
        backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
        return instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)
    assert dm.batch_size == cfg.method.batch_size
    if getattr(method_class, "protocol", "continual") != "continual":
        # a few-shot method composed with the default (continual) dataset: build it anyway
        info = _episode_info(cfg)
        backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
        return instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)
    info = _task_info(cfg)
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, task_info=info)
    assert method.batch_size == cfg.method.batch_size
    trainer_kwargs = {**cfg.trainer, "accelerator": "cpu"}
    pl.Trainer(**trainer_kwargs, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False)
    instantiate(cfg.logger)
    if cfg.get("schedule"):
        instantiate(cfg.schedule)
    return method


@pytest.mark.parametrize("group", ["dataset", "model", "method", "trainer", "logger", "debug",
                                   "schedule"])
def test_every_option_of_every_group_instantiates(compose, group):
    for option in options(group):
        cfg = compose([f"{group}={option}", "paths.output_dir=/tmp/unused"])
        if group == "model":
            # backbones need an input of their kind: pair image models with CIFAR
            cfg = compose([f"model={option}", "dataset=cifar100", "paths.output_dir=/tmp/x"])
        _instantiate_all(cfg)


def test_every_source_composes_into_a_continual_dataset(compose):
    """dataset/source=<name> swaps the loader under any continual dataset's scenario."""
    assert options("dataset/source") == ["bundled", "cifar10", "cifar100", "cifar10_100", "mer",
                                         "mnist", "tinyimagenet"]
    for source in options("dataset/source"):
        cfg = compose([f"dataset/source={source}", "paths.output_dir=/tmp/unused"])
        dm = instantiate(cfg.dataset)
        assert dm.source.func.__name__ == f"load_{source}"
    # The MER files hold the dataset's own benchmark.
    cfg = compose(["dataset=mnist_many_permutations", "dataset/source=mer"])
    assert instantiate(cfg.dataset).source.keywords["scenario"].endswith(
        ".mnist_many_permutations")


def test_every_experiment_composes_and_instantiates(compose):
    experiments = options("experiment")
    assert len(experiments) > 40  # La-MAML, baselines, LibContinual, MAML paper cells
    for experiment in experiments:
        cfg = compose([f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
        _instantiate_all(cfg)
        # and the config rules accept it (they run before any data is loaded)
        assert validate_config(cfg) in ("continual", "episodic"), experiment


def test_defaults_are_the_documented_default_experiment(compose):
    cfg = compose(["paths.output_dir=/tmp/unused"])
    assert cfg.method._target_ == "metacl.methods.lamaml.LaMAML"
    assert cfg.method.glances == 5 and cfg.method.opt_lr == 0.3 and cfg.method.alpha_init == 0.15
    assert cfg.method.memories == 200 and cfg.method.replay_batch_size == 10
    assert cfg.dataset.scenario._target_ == "metacl.data.scenarios.mnist_rotations"
    assert cfg.dataset.source._target_ == "metacl.data.sources.load_bundled"
    assert cfg.dataset.n_tasks == 20 and cfg.dataset.samples_per_task == 1000
    assert cfg.method.n_epochs == 1 and cfg.trainer.max_epochs == 1


def test_method_owns_batch_size_and_epochs(compose):
    cfg = compose(["method.batch_size=7", "method.n_epochs=3", "paths.output_dir=/tmp/x"])
    assert cfg.dataset.batch_size == 7 and cfg.trainer.max_epochs == 3


def test_mlp_is_the_la_maml_mnist_net(compose):
    cfg = compose(["paths.output_dir=/tmp/x"])
    model = instantiate(cfg.model, input_shape=(1, 28, 28), n_outputs=10)
    assert isinstance(model, MLP)
    assert sum(p.numel() for p in model.parameters()) == 784 * 100 + 100 + 100 * 100 + 100 + 1010
