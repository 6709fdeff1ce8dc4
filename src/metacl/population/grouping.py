"""Which jobs of a multirun train together (hydra/launcher=population).

Jobs form one population when their composed configs are equal except for `seed` and for
the method's `population_keys` (float hyperparameters its Population class stacks per
member), and the method has a Population class. Anything else that differs (another method,
dataset, model, a boolean or an integer hyperparameter, the trainer, the resume settings)
makes another group. Groups hold at most `max_members` jobs; a job alone runs as with the
basic launcher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from metacl.errors import ConfigError


@dataclass
class Group:
    jobs: list[int]  # positions in the launcher's job list
    why_alone: str | None = None  # for a one-job group: why it trains alone
    keys: list[str] = field(default_factory=list)  # the keys its members differ in


def method_class(cfg: DictConfig):
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "method._target_")
    try:
        return get_class(str(target)) if target else None
    except Exception:  # noqa: BLE001  (a bad target fails in the job itself, with its error)
        return None


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def group_key(cfg: DictConfig) -> tuple[str | None, str]:
    """(None, key) when the job can join a population, else (why not, a unique key)."""
    cls = method_class(cfg)
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    unique = json.dumps(raw, sort_keys=True, default=str)
    if cls is None or getattr(cls, "population_class", None) is None:
        name = cls.__name__ if cls is not None else OmegaConf.select(cfg, "method._target_")
        return f"{name} has no population implementation", unique
    raw.pop("seed", None)
    method = raw.get("method") or {}
    for key in cls.population_keys:
        if key in method:
            if not is_number(method[key]):
                return f"method.{key}={method[key]} is not a number", unique
            method.pop(key)
    return None, json.dumps(raw, sort_keys=True, default=str)


def group_jobs(configs: list[DictConfig], max_members: int) -> list[Group]:
    """The populations (and lone jobs) of a list of composed job configs, in job order."""
    if not is_number(max_members) or int(max_members) != max_members or max_members < 1:
        raise ConfigError(f"hydra.launcher.max_members={max_members}: allowed: a whole "
                          "number >= 1 (members trained together in one program)")
    groups: list[Group] = []
    open_groups: dict[str, Group] = {}
    for i, cfg in enumerate(configs):
        why, key = group_key(cfg)
        if why is not None:
            groups.append(Group([i], why_alone=why))
            continue
        group = open_groups.get(key)
        if group is None or len(group.jobs) >= max_members:
            group = open_groups[key] = Group([])
            groups.append(group)
        group.jobs.append(i)
    for group in groups:
        if len(group.jobs) == 1 and group.why_alone is None:
            group.why_alone = "no other job of the sweep differs from it only in population keys"
        elif len(group.jobs) > 1:
            group.keys = differing_keys([configs[i] for i in group.jobs])
    return groups


def differing_keys(configs: list[DictConfig]) -> list[str]:
    """The top-level `seed` and `method.*` keys whose values differ between the configs."""
    keys = []
    if len({c.seed for c in configs}) > 1:
        keys.append("seed")
    method = [OmegaConf.to_container(c.method, resolve=False) for c in configs]
    for key in method[0]:
        if len({json.dumps(m.get(key), default=str) for m in method}) > 1:
            keys.append(f"method.{key}")
    return keys
