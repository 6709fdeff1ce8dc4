"""The run folder: one run at a time (a lock), Hydra's record written only once the run is
accepted, and no empty folder left behind by a command that was refused.

Hydra creates the output folder (and its job log) before the task function runs; with
`hydra.output_subdir: null` (conf/hydra/default.yaml) it no longer writes `.hydra/` there, so a
refused command (a bad value, a resume whose config differs) cannot rewrite an existing run's
`.hydra/config.yaml` and `overrides.yaml`. The runner writes them itself, under the lock.

A refused command removes the folder Hydra made for it only under the lock and only while it
holds nothing but the job log (RunFolder.abandon): two commands into one folder (the same
`hydra.run.dir`) both see it that way when they start, and the one refused must not remove
what the other has taken and written since.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from metacl.errors import ConfigError

LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"
HYDRA_LOG_SUFFIX = ".log"  # Hydra's job log (train.log), created before the task runs


def is_fresh(out_dir: Path, ignore: tuple[str, ...] = ()) -> bool:
    """The folder holds nothing but the job log Hydra opened for this command (and the names in
    `ignore`): Hydra made it just now, and a refused command may remove it again. (A folder
    that existed before, even an empty one, is never fresh.)"""
    if not out_dir.is_dir():
        return False
    entries = [p for p in out_dir.iterdir() if p.name not in ignore]
    return bool(entries) and all(p.is_file() and p.suffix == HYDRA_LOG_SUFFIX
                                 and p.stat().st_size < 4096 for p in entries)


def remove_fresh(out_dir: Path) -> None:
    """Remove a folder this command created and filled with nothing of value."""
    if out_dir.is_dir():
        shutil.rmtree(out_dir, ignore_errors=True)


class FolderLock:
    """An exclusive lock on `<out_dir>/.lock` for the duration of the run (flock: released by
    the kernel when the process ends, however it ends)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take the lock: None, or the pid of the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                return holder
            # A refused command removes its folder (and this file) while holding the lock: a
            # lock taken on the removed file guards nothing; take the one on the path now.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return None

    def acquire(self) -> None:
        holder = self.try_acquire()
        if holder is not None:
            raise ConfigError(
                f"paths.output_dir={self.path.parent} is in use by another run (pid {holder}); "
                "allowed: a folder no other run writes to (e.g. leave hydra.run.dir unset)"
            )

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunFolder:
    """A command's output folder: the lock its run takes once accepted (`lock`), and what a
    command refused before its run started leaves behind (`abandon`).

    Whether Hydra made the folder for this command is seen when the command starts (`fresh`:
    nothing in it but the job log). Another command may start into the same folder meanwhile
    (the same `hydra.run.dir`), take it and fill it: so a refused command removes the folder
    only under the lock, and only when it still holds nothing but the job log. A folder that
    another run holds (its lock), or into which one wrote anything, is left as it is."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.fresh = is_fresh(self.out_dir)
        self.lock = FolderLock(self.out_dir)

    def abandon(self) -> None:
        """The command was refused (or failed) before its run started: release the lock and
        remove the folder if this command created it and no other command has used it."""
        try:
            if self.fresh and self.out_dir.is_dir():
                if self.lock.fd is None and self.lock.try_acquire() is not None:
                    return  # another run holds the folder: everything in it is its own
                if is_fresh(self.out_dir, ignore=(LOCK_FILE,)):
                    remove_fresh(self.out_dir)  # the lock file with it, while still held
        except OSError:
            pass  # the folder cannot be examined or locked: leave it
        finally:
            self.lock.release()


def write_hydra_record(out_dir: Path, cfg: DictConfig) -> None:
    """`.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, as Hydra writes them, once the
    run is accepted (nothing when composed without Hydra's runtime: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    folder = Path(out_dir) / HYDRA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml", resolve=False)
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")
