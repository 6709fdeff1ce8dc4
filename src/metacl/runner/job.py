"""Who a job is: its readable name, its W&B group/job type/tags, and Hydra's view of it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class JobInfo:
    """Who this job is: its readable name, W&B group/job type/tags, and Hydra's view of it."""

    name: str
    group: str | None = None
    job_type: str | None = None  # the method (W&B job_type)
    tags: list[str] = field(default_factory=list)
    multirun: bool = False
    hydra: dict = field(default_factory=dict)  # choices, overrides, job_num, sweep_dir


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# Keys that say where a run goes, how it is logged or resumed, or which seed it draws: runs
# that differ only in them are one configuration (one W&B group).
NOT_CONFIGURATION = ("seed", "resume", "checkpoint", "save_checkpoints", "logger", "data_dir",
                     "paths", "tags", "extras", "callbacks", "threads", "cpu_allocator")


def config_group(cfg: DictConfig, method: str | None, dataset: str | None) -> str:
    """`<method>-<dataset>-<hash>`: the same for every seed of one configuration (the hash is
    over the unresolved config without NOT_CONFIGURATION, so `${seed}` stays a reference)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key in NOT_CONFIGURATION:
        raw.pop(key, None)
    digest = hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    if method is None and OmegaConf.select(cfg, "method._target_"):
        method = str(cfg.method._target_).rsplit(".", 1)[-1].lower()
    return "-".join(str(p) for p in (method, dataset) if p)[:110] + f"-{digest[:8]}"


def job_info(cfg: DictConfig) -> JobInfo:
    """Name the job from its overrides; its W&B group is its configuration without the seed.

    name: `<method>-<dataset>-seed<seed>[-<other overrides>]` (the keys Hydra's output folder
    names also leave out are left out here); group: config_group; job_type: the method; tags:
    method, dataset, search, `multirun` and `sweep:<sweep folder>` in a multirun, the
    top-level `tags`.
    """
    user_tags = [str(t) for t in (cfg.get("tags") or [])]
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        group = config_group(cfg, None, None)
        return JobInfo(name=f"run-seed{cfg.seed}", group=group,
                       job_type=group.rsplit("-", 1)[0] or None, tags=user_tags)
    choices = {k: v for k, v in hc.runtime.choices.items()
               if k != "hydra" and not str(k).startswith("hydra/")}
    method, dataset = choices.get("method"), choices.get("dataset")
    search = choices.get("hparams_search")
    overrides = [str(o) for o in hc.overrides.task]
    excluded = {"method", "dataset", "seed", "hparams_search"}
    excluded |= set(hc.job.config.override_dirname.exclude_keys or [])
    extra = [o for o in overrides if _override_key(o) not in excluded]
    name = f"{method}-{dataset}-seed{cfg.seed}" + (f"-{','.join(extra)}" if extra else "")
    multirun = hc.mode == RunMode.MULTIRUN
    info = {"choices": choices, "overrides": overrides,
            "mode": "MULTIRUN" if multirun else "RUN"}
    tags = [*user_tags, *(str(t) for t in (method, dataset, search) if t)]
    if multirun:
        info.update(job_num=int(hc.job.num), sweep_dir=str(hc.sweep.dir))
        tags += ["multirun", f"sweep:{Path(str(hc.sweep.dir)).name}"]
    return JobInfo(
        name=name[:128], group=config_group(cfg, method, dataset), job_type=method,
        tags=list(dict.fromkeys(tags)), multirun=multirun, hydra=info,
    )


def resolved_config(cfg: DictConfig, job: JobInfo) -> dict:
    """The resolved config (as results.json and W&B keep it) plus Hydra's choices/overrides
    under `hydra`, so a report can tell runs apart without the .hydra folder."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an unresolvable value is itself why a job failed
        config = OmegaConf.to_container(cfg, resolve=False)
    if job.hydra:
        config["hydra"] = job.hydra
    return config
