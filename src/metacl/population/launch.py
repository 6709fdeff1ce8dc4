"""The population launcher's work: compose the jobs, group them, prepare every member as a
separate run would be prepared, train each group together, return one JobReturn per job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from metacl.checkpoint import Interrupted
from metacl.cli import user_error
from metacl.population.episodic import EpisodicPopulationLoop
from metacl.population.grouping import group_jobs
from metacl.population.loop import PopulationLoop
from metacl.population.members import Member, MemberRandom
from metacl.runner.folder import RunFolder
from metacl.runner.job import job_info
from metacl.runner.main import prepare_loop, record_failed_job
from metacl.runner.session import console


def launch(launcher, job_overrides, initial_job_idx: int):
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        job = launcher.hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.id = idx
            job.hydra.job.num = idx
        configs.append(job)
    try:
        groups = group_jobs(configs, launcher.max_members)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        sys.exit(2)
    returns = [None] * len(configs)
    for group in groups:
        if len(group.jobs) == 1:
            i = group.jobs[0]
            console.print(f"job {initial_job_idx + i} trains alone: {group.why_alone}")
            returns[i] = run_job(hydra_context=launcher.hydra_context,
                                 task_function=launcher.task_function, config=configs[i],
                                 job_dir_key="hydra.sweep.dir",
                                 job_subdir_key="hydra.sweep.subdir")
        else:
            members = [prepare_member(launcher, i, configs[i]) for i in group.jobs]
            differ = ", ".join(group.keys) or "nothing"
            console.print(f"population of {len(members)} jobs "
                f"({', '.join(str(initial_job_idx + i) for i in group.jobs)}), differing in "
                f"{differ}")
            train_members(members)
            for m in members:
                returns[m.index] = m.ret
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


def prepare_member(launcher, index: int, config: DictConfig) -> Member:
    """Hydra's run_job with a task function that prepares the job's loop (validation, resume
    plan, data, method, folder lock, logger) without training it."""
    member = Member(index=index, hydra_cfg=None, ret=None)

    def prepare(cfg: DictConfig) -> float:
        member.hydra_cfg = HydraConfig.instance().cfg
        started = time.perf_counter()
        out_dir = Path(str(cfg.paths.output_dir))
        folder = RunFolder(out_dir)
        lock = folder.lock
        try:
            loop = prepare_loop(cfg, out_dir, started, lock)
        except Exception as err:  # noqa: BLE001  (recorded as a multirun job's failure)
            folder.abandon()
            member.active = False
            return record_failed_job(cfg, job_info(cfg), err)
        except BaseException:
            folder.abandon()
            raise
        if not hasattr(loop, "run"):  # already completed: its metric
            lock.release()
            member.active = False
            return loop
        member.loop, member.lock = loop, lock
        member.random = MemberRandom(loop.session.device)
        return float("nan")

    member.ret = run_job(hydra_context=launcher.hydra_context, task_function=prepare,
                         config=config, job_dir_key="hydra.sweep.dir",
                         job_subdir_key="hydra.sweep.subdir")
    if member.ret.status == JobStatus.COMPLETED:
        member.value = member.ret.return_value
    else:  # a bug in the preparation: Hydra kept the exception
        member.active = False
        print(f"job {index}: {member.ret._return_value!r}", file=sys.stderr)
    return member


# The population loop of each protocol (a method's `protocol`): continual streams, few-shot
# episodes (metacl.population.episodic).
POPULATION_LOOPS = {"continual": PopulationLoop, "episodic": EpisodicPopulationLoop}


def train_members(members: list[Member]) -> None:
    """The prepared members together (their protocol's population loop), or one by one when
    one of them cannot join a population; every JobReturn gets its job's metric."""
    ready = [m for m in members if m.active]
    blockers = {m.method.population_blocker() for m in ready} - {None}
    protocols = {m.method.protocol for m in ready}
    loop = POPULATION_LOOPS.get(protocols.pop()) if len(protocols) == 1 else None
    if loop is None and ready:
        blockers.add("no population loop for these jobs' protocols")
    elif len(ready) > 1 and not blockers and hasattr(loop, "blocker"):
        blockers |= {loop.blocker(ready)} - {None}
    try:
        if len(ready) > 1 and not blockers:
            loop(ready).run()
        else:
            if ready and blockers:
                console.print(f"these jobs train one by one: {'; '.join(sorted(blockers))}")
            for m in ready:
                run_alone(m)
    except Interrupted as err:
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        for m in members:
            if m.lock is not None:
                m.lock.release()
            m.ret.return_value = m.value
            m.ret.status = JobStatus.COMPLETED


def run_alone(m: Member) -> None:
    """One prepared member's own loop, as a separate run (failures recorded, not raised)."""
    with m.job():
        try:
            m.value = m.loop.run()
        except Exception as err:  # noqa: BLE001  (the loop recorded it in results.json)
            cfg = m.loop.session.cfg
            m.value = record_failed_job(cfg, job_info(cfg), err)
