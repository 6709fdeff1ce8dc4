"""Who a job is: its readable name, its W&B group/job type/tags, and Hydra's view of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class JobInfo:
    """Who this job is: its readable name, W&B group/job type/tags, and Hydra's view of it."""

    name: str
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    multirun: bool = False
    hydra: dict = field(default_factory=dict)  # choices, overrides, job_num, sweep_dir


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_info(cfg: DictConfig) -> JobInfo:
    """Name the job from its overrides; in a multirun, its sweep is the W&B group.

    name: `<method>-<dataset>-seed<seed>[-<other overrides>]` (the keys Hydra's output folder
    names also leave out are left out here); group: `<task_name>-<sweep folder>`.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        return JobInfo(name=f"run-seed{cfg.seed}")
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
    group = None
    if multirun:
        info.update(job_num=int(hc.job.num), sweep_dir=str(hc.sweep.dir))
        group = f"{cfg.get('task_name', 'train')}-{Path(str(hc.sweep.dir)).name}"
    return JobInfo(
        name=name[:128], group=group,
        job_type="hparams_search" if search else ("sweep" if multirun else "train"),
        tags=[str(t) for t in (method, dataset, search) if t], multirun=multirun, hydra=info,
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
