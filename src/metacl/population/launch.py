"""The population launcher's work: compose the jobs, group them, prepare every member as a
separate run would be prepared, train each group together, return one JobReturn per job.

`hydra.launcher.processes` splits a group over forked processes on a CPU (one core each, at
least two members each): a population on one core is bound by arithmetic, so the cores left
idle by one run's single thread are the rest of the speed-up (docs/sweeps.md). The parent
forwards a stop signal to its children as SIGTERM, waits for their checkpoints, and exits as
a stopped run does (or lets submitit requeue the job on SIGUSR2). A group that runs out of
memory is trained again in halves, each member resumed from its last checkpoint.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus, configure_log, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from metacl.checkpoint import Interrupted
from metacl.cli import user_error
from metacl.errors import ConfigError
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
        processes = [group_processes(launcher.processes, [configs[i] for i in g.jobs])
                     for g in groups]
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        sys.exit(2)
    returns = [None] * len(configs)
    for group, n_processes in zip(groups, processes):
        if len(group.jobs) == 1:
            i = group.jobs[0]
            console.print(f"job {initial_job_idx + i} trains alone: {group.why_alone}")
            returns[i] = run_job(hydra_context=launcher.hydra_context,
                                 task_function=launcher.task_function, config=configs[i],
                                 job_dir_key="hydra.sweep.dir",
                                 job_subdir_key="hydra.sweep.subdir")
        elif n_processes > 1:
            for index, ret in train_in_processes(launcher, configs, group, n_processes,
                                                 initial_job_idx).items():
                returns[index] = ret
        else:
            for m in train_group(launcher, configs, group, group.jobs, initial_job_idx):
                returns[m.index] = m.ret
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return returns


def train_group(launcher, configs, group, jobs: list[int], initial_job_idx: int,
                processes: int = 1) -> list[Member]:
    """Prepare the jobs `jobs` of `group` and train them together; their members."""
    members = [prepare_member(launcher, i, configs[i]) for i in jobs]
    for m in members:
        m.processes = processes
    differ = ", ".join(group.keys) or "nothing"
    where = f" in process {os.getpid()}" if processes > 1 else ""
    console.print(f"population of {len(members)} jobs "
                  f"({', '.join(str(initial_job_idx + i) for i in jobs)}), differing in "
                  f"{differ}{where}")
    train_members(members)
    retry = [m.index for m in members if m.out_of_memory]
    if len(retry) > 1 and all(bool(configs[i].get("save_checkpoints", True)) for i in retry):
        return [m for m in members if not m.out_of_memory] + retry_smaller(
            launcher, configs, group, retry, initial_job_idx, processes)
    return members


def retry_smaller(launcher, configs, group, jobs: list[int], initial_job_idx: int,
                  processes: int) -> list[Member]:
    """Members that ran out of memory together, trained again in two halves (and so on while
    they do not fit), each resumed from its own last checkpoint (the start of the run, or the
    task or in-task checkpoint it saved last), exactly as `resume=true` would."""
    import gc

    import torch

    half = (len(jobs) + 1) // 2
    console.print(f"out of memory with {len(jobs)} members together: training them again in "
                  f"groups of at most {half}, each from its last checkpoint")
    gc.collect()  # the failed population's stacked state, then the allocator's cached blocks
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    again = list(configs)
    for i in jobs:
        again[i] = copy.deepcopy(configs[i])
        with open_dict(again[i]):
            again[i].resume.path = True
    members = []
    for part in (jobs[:half], jobs[half:]):
        members += train_group(launcher, again, group, part, initial_job_idx, processes)
    return members


def usable_cores() -> int:
    """The cores this process may run on (a SLURM job's allocation, a taskset), not the
    machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def group_processes(setting, configs: list[DictConfig]) -> int:
    """How many processes train one group: `processes` (an integer >= 1), or auto: on a
    CPU, one per core, with at least two members each; on a GPU one."""
    if setting == "auto":
        from metacl.runner.trainer import auto_device

        # Ask NVML, not the CUDA runtime, whether a GPU is there: a runtime initialised here
        # could not be used by the processes forked below.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

        trainer, _ = auto_device(configs[0].trainer, configs[0].get("model"))
        accelerator = trainer.get("accelerator", "auto")
        import torch

        on_cpu = accelerator == "cpu" or (accelerator == "auto"
                                          and not torch.cuda.is_available())
        return max(1, min(usable_cores(), len(configs) // 2)) if on_cpu else 1
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"hydra.launcher.processes={setting}: allowed: auto or a whole "
                          "number >= 1")
    return min(setting, len(configs))


def train_in_processes(launcher, configs, group, n: int, initial_job_idx: int) -> dict:
    """The group split into n contiguous parts, each trained as a population in a forked
    process with 1/n of the CPU threads; their JobReturns by job index."""
    from metacl.runner import cpu

    jobs = list(group.jobs)
    parts = [jobs[k * len(jobs) // n:(k + 1) * len(jobs) // n] for k in range(n)]
    context = multiprocessing.get_context("fork")
    children = []
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for process, _ in children:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    stop_signals = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGUSR2")
                    if hasattr(signal, s)]
    previous = {s: signal.signal(s, forward) for s in stop_signals}
    for part in parts:
        receive, send = context.Pipe(duplex=False)

        def child(part=part, send=send):
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the parent, which forwards it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's forwarding
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if hasattr(signal, "SIGUSR2"):  # the parent answers submitit's signal
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
            cpu.DEFAULT_THREADS = max(1, cpu.DEFAULT_THREADS // n)
            members = train_group(launcher, configs, group, part, initial_job_idx, n)
            send.send({m.index: m.ret for m in members})

        process = context.Process(target=child, daemon=False)
        # blocked across the fork: the child takes them only once its own handlers are set
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        send.close()
        children.append((process, receive))
        if received:  # a stop signal came while the processes started
            os.kill(process.pid, signal.SIGTERM)
    returns, failed = {}, []
    try:
        for process, receive in children:
            try:
                returns.update(receive.recv())
            except EOFError:  # stopped by a signal, or crashed: its exit code says which
                pass
            process.join()
            if process.exitcode:
                failed.append(process.exitcode)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        usr2 = getattr(signal, "SIGUSR2", None)
        if received[0] == usr2 and callable(previous.get(usr2)):
            previous[usr2](usr2, None)  # submitit: requeue this job (its handler exits)
        sys.exit(128 + (signal.SIGTERM if received[0] == usr2 else received[0]))
    if failed:
        print(f"error: a population process exited with code {failed[0]}", file=sys.stderr)
        sys.exit(failed[0])
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
