"""Config validation before any data is loaded and before anything is written.

`validate_config(cfg)` runs the rules below in order and raises `ConfigError` (a one-line
message naming the key, the bad value and what is allowed) at the first broken one; train.py
prints it as `error: ...` and exits with code 2, no traceback (unless HYDRA_FULL_ERROR=1).
Data files themselves (missing, corrupt, wrong shape) are checked where they are read
(metacl.data.sources / episodic) with the same kind of message. The table is the documentation
(docs/reliability.md lists it too):

| rule                     | keys                                                          |
|--------------------------|---------------------------------------------------------------|
| positive numbers         | method.lr, opt_lr, opt_wt, alpha_init, meta_lr, inner_lr,      |
|                          | batch_size, n_epochs, glances, memories, memory_size,          |
|                          | n_memories, replay_batch_size, meta_batch_size, inner_steps   |
|                          | (lr finite and > 0; counts >= 1; memories >= 0)                |
| seed, checkpoints        | seed (an integer), checkpoint.every_n_steps >= 0,              |
|                          | save_checkpoints true/false                                   |
| group keys               | every method./model./dataset. key is an argument of its class |
| debug limits             | dataset.limit_* null or >= 1 (data.datamodule.check_limits)    |
| method fits the dataset  | method class protocol == dataset class protocol                |
| task ids exist           | a method needing task ids at test time on a scenario with them |
| method builds on model   | pathnet/pnn (a class's `network_models`): model=mlp/mlp_hat/alexnet |
| dataset nodes            | dataset.source / dataset.scenario: nodes with an importable    |
|                          | _target_ (a string names the dataset/source group's options)   |
| classes split into tasks | dataset.n_tasks; dataset.scenario.classes_per_task,            |
|                          | init_cls_num, inc_cls_num (class count: the loader's facts)    |
| enough samples           | dataset.samples_per_task <= training samples of the source     |
|                          | (the loader's `facts`, metacl.data.sources)                    |
| model takes the input    | model built and run on one zero batch of the dataset's shape   |
| few-shot ways            | dataset.ways / train_ways <= classes of the episode pools      |
| trainer                  | trainer.accelerator in auto/cpu/gpu (+ a visible GPU for gpu) |
| threads                  | auto, null or an integer >= 1                                  |
| cpu_allocator            | tuned or system (metacl.allocator)                            |
| resume                   | metacl.checkpoint.plan_resume (checkpoint present, same config)|
| output folder writable   | paths.output_dir                                               |
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hydra.utils import get_class, get_object
from omegaconf import DictConfig

from metacl.allocator import check_cpu_allocator
from metacl.errors import ConfigError
from metacl.runner.trainer import check_trainer

# How a run proceeds is decided by its datamodule's `protocol` (metacl.runner.main.LOOPS).
PROTOCOLS = ("continual", "episodic")

# method keys that must be > 0 (rates) or >= 1 (counts) when present; >= 0 (memories).
POSITIVE_RATES = ("lr", "opt_lr", "opt_wt", "alpha_init", "meta_lr", "inner_lr")
POSITIVE_COUNTS = ("batch_size", "n_epochs", "glances", "meta_batch_size", "inner_steps",
                   "inner_steps_test", "fisher_batch_size", "ref_batch_size")
NON_NEGATIVE_COUNTS = ("memories", "memory_size", "n_memories", "replay_batch_size")


def _number(key: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")
    return float(value)


def check_method_numbers(method: DictConfig) -> None:
    for name in POSITIVE_RATES:
        value = method.get(name)
        if value is None:
            continue
        x = _number(f"method.{name}", value, "a finite number > 0")
        if not math.isfinite(x) or x <= 0:
            raise ConfigError(f"method.{name}={value!r} is invalid; allowed: a finite number > 0")
    for names, least in ((POSITIVE_COUNTS, 1), (NON_NEGATIVE_COUNTS, 0)):
        for name in names:
            value = method.get(name)
            if value is None:
                continue
            allowed = f"an integer >= {least}"
            x = _number(f"method.{name}", value, allowed)
            if x < least or x != int(x):
                raise ConfigError(f"method.{name}={value!r} is invalid; allowed: {allowed}")


def check_protocols(cfg: DictConfig) -> str:
    """The dataset's protocol (continual/episodic), refusing a method of the other kind."""
    dataset_cls = get_class(cfg.dataset._target_)
    protocol = getattr(dataset_cls, "protocol", "continual")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"dataset protocol '{protocol}' is unknown; allowed: "
                          f"{', '.join(PROTOCOLS)}")
    method_cls = get_class(cfg.method._target_)
    method_protocol = getattr(method_cls, "protocol", "continual")
    if method_protocol != protocol:
        raise ConfigError(
            f"method {cfg.method._target_.rsplit('.', 1)[-1]} runs on {method_protocol} "
            f"datasets, not on {cfg.dataset._target_.rsplit('.', 1)[-1]} ({protocol}); "
            f"pick a {method_protocol} dataset (docs/methods.md)")
    return protocol


def _class_counts(ds: DictConfig, n_classes: int) -> list[int]:
    """Classes per task from n_tasks and the class split's classes_per_task / init_cls_num /
    inc_cls_num (keys of dataset.scenario)."""
    n_tasks, sc = ds.get("n_tasks"), ds.scenario
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise ConfigError(f"dataset.n_tasks={n_tasks!r} is invalid; allowed: an integer >= 1")
    per_task, init, inc = sc.get("classes_per_task"), sc.get("init_cls_num"), sc.get("inc_cls_num")
    for key, value in (("classes_per_task", per_task), ("init_cls_num", init),
                       ("inc_cls_num", inc)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"dataset.scenario.{key}={value!r} is invalid; allowed: an "
                              "integer >= 1")
    if per_task is not None and (init is not None or inc is not None):
        raise ConfigError(f"dataset.scenario.classes_per_task={per_task} conflicts with "
                          "dataset.scenario.init_cls_num/inc_cls_num; give one or the other")
    if init is not None or inc is not None:
        init = inc if init is None else init
        if inc is None and n_tasks > 1:
            rest = n_classes - init
            if rest <= 0 or rest % (n_tasks - 1):
                raise ConfigError(
                    f"dataset.scenario.init_cls_num={init} leaves {rest} of {n_classes} "
                    f"classes, which do not split evenly into dataset.n_tasks-1={n_tasks - 1} "
                    "tasks; set dataset.scenario.inc_cls_num")
            inc = rest // (n_tasks - 1)
        sizes = [init] + [inc] * (n_tasks - 1)
        described = f"dataset.scenario.init_cls_num={init}, dataset.scenario.inc_cls_num={inc}"
    else:
        if per_task is None:
            if n_classes % n_tasks:
                raise ConfigError(f"dataset.n_tasks={n_tasks} does not divide the {n_classes} "
                                  "classes evenly; set dataset.scenario.classes_per_task or "
                                  "dataset.scenario.init_cls_num/inc_cls_num")
            per_task = n_classes // n_tasks
        sizes = [per_task] * n_tasks
        described = f"dataset.scenario.classes_per_task={per_task}"
    if sum(sizes) > n_classes:
        raise ConfigError(f"dataset.n_tasks={n_tasks} with {described} needs {sum(sizes)} "
                          f"classes; the source has {n_classes}")
    return sizes


def _group_options(group: str) -> str:
    """The options of a config group, as Hydra sees them (empty outside a Hydra run)."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return ""
    options = GlobalHydra.instance().config_loader().get_group_options(group)
    return f"; allowed: {', '.join(sorted(options))}" if options else ""


def _target(ds: DictConfig, key: str, group: str | None = None):
    """The object a dataset node (`source`, `scenario`) names by its _target_, with one line
    for a value that is no such node (e.g. the string of a retired `dataset.source=mnist`)."""
    node = ds.get(key)
    if not isinstance(node, DictConfig) or "_target_" not in node:
        hint = f"; choose one with {group}=<name>{_group_options(group)}" if group else ""
        raise ConfigError(f"dataset.{key}={node!r} is not a {key} config (a node with a "
                          f"_target_){hint}")
    try:
        return get_object(node._target_)
    except Exception as err:  # Hydra raises ImportError or its own wrapper
        raise ConfigError(f"dataset.{key}._target_={node._target_} cannot be imported "
                          f"({type(err).__name__})") from err


def check_continual_dataset(ds: DictConfig) -> tuple[tuple[int, ...], int] | None:
    """Rules for ContinualDataModule configs; returns the input shape and the number of
    classes when the source's loader states them (`loader.facts`, metacl.data.sources)."""
    from metacl.data.sources import facts_of

    facts = facts_of(_target(ds, "source", "dataset/source"))
    builder = _target(ds, "scenario")
    if facts is None:
        return None  # a loader of the user's own, without facts: checked when it is built
    for key in ("batch_size", "eval_batch_size"):
        value = ds.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"dataset.{key}={value!r} is invalid; allowed: an integer >= 1")
    if any(key in ds.scenario for key in ("classes_per_task", "init_cls_num", "inc_cls_num")):
        _class_counts(ds, facts.classes)
    elif ds.get("n_tasks") is not None:
        n_tasks = ds.n_tasks
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
            raise ConfigError(f"dataset.n_tasks={n_tasks!r} is invalid; allowed: an integer >= 1")
    samples = ds.get("samples_per_task")
    if samples not in (None, "all") and not getattr(builder, "disjoint_classes", False):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"dataset.samples_per_task={samples!r} is invalid; allowed: an "
                              "integer >= 1, or all")
        available = facts.train
        if available is not None and samples > available:
            name = ds.source._target_.rsplit(".", 1)[-1]
            raise ConfigError(f"dataset.samples_per_task={samples} is larger than the "
                              f"{available} training samples of source {name}; allowed: "
                              f"1..{available}")
    return facts.shape, facts.classes


def _pool_sizes(ds: DictConfig, facts) -> tuple[int, ...] | None:
    """Classes of the meta-train / val / test pools: fixed by the source, or its class_split
    (characters x4 where each is also a class at 90/180/270 degrees)."""
    if facts.pools is not None:
        return facts.pools
    split = ds.source.get("class_split")
    if split is None or len(split) != 3:
        return None
    turns = 4 if (facts.split_counts_base and ds.source.get("rotations")) else 1
    return tuple(int(s) * turns for s in split)


def check_episodic_dataset(ds: DictConfig) -> tuple[tuple[int, ...], bool] | None:
    """Rules for EpisodicDataModule configs; returns the input shape and whether the episodes
    are regression tasks, when the source states them (`facts`, metacl.data.episodic)."""
    from metacl.data.sources import facts_of

    facts = facts_of(_target(ds, "source"))
    if facts is None:
        return None
    pools = _pool_sizes(ds, facts)
    if pools is not None:
        name = facts.name
        ways = ds.get("ways") or 1
        train_ways = ds.get("train_ways") or ways
        train, val, test = pools
        if train_ways > train:
            key = "train_ways" if ds.get("train_ways") else "ways"
            raise ConfigError(f"dataset.{key}={train_ways} is more than the {train} meta-training "
                              f"classes of {name}; allowed: 1..{train}")
        for split, size, used in (("validation", val, (ds.get("val_episodes") or 0) > 0),
                                  ("test", test, True)):
            if used and ways > size:
                raise ConfigError(f"dataset.ways={ways} is more than the {size} {split} classes "
                                  f"of {name}; allowed: 1..{size}")
    return facts.shape, facts.regression


def check_task_ids(cfg: DictConfig, protocol: str) -> None:
    """A method that must be told the task at test time needs a scenario that has task ids
    (tasks of disjoint classes: the builder's `disjoint_classes`, metacl.data.scenarios)."""
    if protocol != "continual":
        return
    method_cls = get_class(cfg.method._target_)
    if not getattr(method_cls, "needs_task_ids", False):
        return
    if not getattr(_target(cfg.dataset, "scenario"), "disjoint_classes", False):
        scenario = cfg.dataset.scenario._target_.rsplit(".", 1)[-1]
        raise ConfigError(f"method {method_cls.__name__} needs task ids (one head per task) "
                          f"but dataset.scenario={scenario} has none; allowed: a class_split "
                          "dataset")


def check_network_model(cfg: DictConfig) -> None:
    """A method that builds its own network from the model's sizes (PathNet's modules, PNN's
    columns) or needs what only some models have (HAT's gated units) names the model classes
    it can read in `network_models` (class -> config names)."""
    allowed = getattr(get_class(cfg.method._target_), "network_models", None)
    if not allowed:
        return
    model = cfg.model._target_.rsplit(".", 1)[-1]
    if model not in allowed:
        method = cfg.method._target_.rsplit(".", 1)[-1]
        raise ConfigError(f"method {method} reads its network from the model's layers and "
                          f"cannot read model={model}; allowed: model="
                          f"{', '.join(allowed.values())}")


_MODEL_CHECKS: dict[str, str | None] = {}  # model config + shape -> problem (None = fits)


def check_model_input(cfg: DictConfig, shape: tuple[int, ...] | None, n_outputs: int) -> None:
    """Build the backbone for the dataset's input shape and run it on one zero sample."""
    if shape is None:
        return
    import json

    from omegaconf import OmegaConf

    key = json.dumps([OmegaConf.to_container(cfg.model, resolve=True), shape, n_outputs],
                     default=str)
    if key not in _MODEL_CHECKS:  # the same model/input in a sweep or a test: checked once
        _MODEL_CHECKS[key] = _model_problem(cfg, shape, n_outputs)
    if _MODEL_CHECKS[key]:
        raise ConfigError(_MODEL_CHECKS[key])


def _model_problem(cfg: DictConfig, shape: tuple[int, ...], n_outputs: int) -> str | None:
    import torch
    from hydra.utils import instantiate

    from metacl.cli import user_error

    name = cfg.model._target_.rsplit(".", 1)[-1]
    try:
        model = instantiate(cfg.model, input_shape=shape, n_outputs=n_outputs)
        with torch.no_grad():
            model.eval()
            out = model(torch.zeros(1, *shape))
    except Exception as err:  # noqa: BLE001  (any failure means the shapes do not fit)
        found = user_error(err)
        if found is not None:
            return str(found)
        cause = err
        while cause.__cause__ is not None:  # Hydra wraps the model's own error
            cause = cause.__cause__
        return (f"model={name} cannot take the dataset's input {tuple(shape)} "
                f"({type(cause).__name__}: {str(cause).splitlines()[0][:120]}); allowed: a "
                "model for this input (README: Configuration)")
    if out.shape[-1] != n_outputs:
        return f"model={name} gives {out.shape[-1]} outputs for {n_outputs} classes"
    return None


def check_seed(seed) -> None:
    """seed: an integer (it seeds torch generators, which take nothing else)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} is invalid; allowed: an integer, e.g. seed=3")


def check_run_options(cfg: DictConfig) -> None:
    """Top-level keys of conf/train.yaml that the loops read as numbers."""
    check_seed(cfg.get("seed"))
    every = (cfg.get("checkpoint") or {}).get("every_n_steps", 0)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ConfigError(f"checkpoint.every_n_steps={every!r} is invalid; allowed: 0 (only "
                          "after each task) or an integer >= 1")
    if not isinstance(cfg.get("save_checkpoints", True), bool):
        raise ConfigError(f"save_checkpoints={cfg.get('save_checkpoints')!r} is invalid; "
                          "allowed: true, false")


# Arguments the runner passes itself; a config may not set them.
RUNNER_ARGUMENTS = {"method": ("backbone", "task_info", "episode_info"),
                    "model": ("input_shape", "n_outputs"), "dataset": ()}


def accepted_keys(cls: type) -> set[str] | None:
    """The keyword arguments `cls(...)` accepts, following `**kwargs` up through the metacl
    classes it is passed on to; None when a class outside metacl takes `**kwargs` too."""
    import inspect

    keys: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass is not cls and not klass.__module__.startswith("metacl"):
            return keys - {"self"}  # metacl bases pass nothing on to torch/Lightning classes
        params = inspect.signature(klass.__init__).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return keys - {"self"}
    return None


def check_group_keys(cfg: DictConfig) -> None:
    """Every key of the method, model and dataset configs is an argument of its class (a typo
    or `+method.foo=1` used to end in the constructor's TypeError)."""
    for group, passed in RUNNER_ARGUMENTS.items():
        node = cfg.get(group)
        if node is None or "_target_" not in node:
            continue
        allowed = accepted_keys(get_class(node._target_))
        if allowed is None:
            continue
        allowed -= set(passed)
        for key in node:
            if str(key).startswith("_") and str(key).endswith("_"):
                continue  # _target_, _partial_, ...
            if key not in allowed:
                name = node._target_.rsplit(".", 1)[-1]
                value = repr(node.get(key))
                value = value if len(value) <= 60 else value[:57] + "..."
                raise ConfigError(f"{group}.{key}={value} is not a key of {name}; allowed: "
                                  f"{', '.join(sorted(allowed))}")


def check_dataset_values(ds: DictConfig) -> None:
    """Dataset values checked by the datamodules themselves, checked here before anything is
    written (metacl.data.datamodule.check_limits)."""
    from metacl.data.datamodule import LIMIT_KEYS, check_limits

    check_limits(**{key: ds.get(key) for key in LIMIT_KEYS if key in ds})


def check_writable(out_dir: Path) -> None:
    """The output folder (or its first existing parent) must be writable."""
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"paths.output_dir={out_dir} is not writable ({probe} refuses writes); "
                          "allowed: a folder you can write to, e.g. hydra.run.dir=<dir>")


def validate_config(cfg: DictConfig) -> str:
    """Run every rule (module docstring); return the run's protocol."""
    protocol = check_protocols(cfg)
    check_run_options(cfg)
    check_group_keys(cfg)
    check_method_numbers(cfg.method)
    check_dataset_values(cfg.dataset)
    method_cls = get_class(cfg.method._target_)
    name = cfg.method._target_.rsplit(".", 1)[-1]
    precisions, why = getattr(method_cls, "precisions", ("32-true",)), ""
    if hasattr(method_cls, "precisions_for"):
        precisions, why = method_cls.precisions_for(cfg.method)
    check_trainer(cfg.trainer, precisions, f"{name} ({why})" if why else name)
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or epochs < 1):
        raise ConfigError(f"trainer.max_epochs={epochs!r} is invalid; allowed: an integer >= 1 "
                          "(it follows method.n_epochs)")
    threads = cfg.get("threads", "auto")
    if threads not in ("auto", None) and (isinstance(threads, bool) or not isinstance(threads, int)
                                          or threads < 1):
        raise ConfigError(f"threads={threads!r} is invalid; allowed: auto, null (torch's "
                          "default) or an integer >= 1")
    check_cpu_allocator(cfg.get("cpu_allocator", "tuned"))
    check_task_ids(cfg, protocol)
    check_network_model(cfg)
    if protocol == "continual":
        known = check_continual_dataset(cfg.dataset)
        if known is not None:
            check_model_input(cfg, *known)
    else:
        known = check_episodic_dataset(cfg.dataset)
        if known is not None:
            shape, regression = known
            check_model_input(cfg, shape, 1 if regression else int(cfg.dataset.get("ways") or 1))
    check_writable(Path(str(cfg.paths.output_dir)))
    return protocol
