"""Checkpoints that resume a run exactly, and the signals that trigger one.

Two files in `<run>/checkpoints/`, both written atomically (temporary file + os.replace, so a
kill while saving never leaves a broken file as the latest) and both loadable with
`torch.load(weights_only=True)`: only tensors, numbers, strings, lists and dicts inside.

- `last.ckpt` -- a task boundary: written before the first task (tasks_done = 0) and after every
  task. Everything needed to continue with the next task: the method's `state_dict` (weights,
  learned rates, memories with their counters, Fisher, exemplars, ...), every optimizer's state,
  results.json as it stands (accuracy matrices, metrics, timing), the rows of extra evaluation
  variants, the global batch counter, all random states (python, numpy, torch, CUDA), and the
  resolved config with its hash.
- `step.ckpt` -- inside a task, every `checkpoint.every_n_steps` training batches and when a stop
  signal arrives: the same method/optimizer/random state plus the position (task, epoch, batches
  done in the epoch, that epoch's shuffle order). A resume first restores `last.ckpt`, replays
  `before_task` from there (so everything a method derives when a task starts is rebuilt exactly
  as it was), then loads `step.ckpt` over it and continues with the next batch.

Few-shot (episodic) runs write `last.ckpt` only, inside meta-training (metacl.runner.episodic):
the same state plus the episode generator's, the position (epoch, meta-batches done) and the
validation history.

`docs/reliability.md` describes the whole mechanism.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metacl.errors import ConfigError
from metacl.resolvers import is_set

FORMAT_VERSION = 1
BOUNDARY_FILE = "last.ckpt"
STEP_FILE = "step.ckpt"
# Keys that may change between a run and its resumption without refusing it: where things
# are, how they are logged, how often checkpoints are taken, and the resume request itself.
IGNORED_KEYS = ("resume", "checkpoint", "save_checkpoints", "logger", "data_dir", "paths",
                "hydra", "dataset.source.data_dir", "dataset.source.download", "tags", "extras")
FINISHED = "completed"


# ------------------------------------------------------------------------------ files
def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, flushed, then renamed over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """A checkpoint, loaded safely (weights_only: no arbitrary pickle is executed)."""
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes); delete it to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0]
        if "central directory" in first or isinstance(err, EOFError):  # a cut-off zip
            why = "it is truncated"
        else:
            why = f"{type(err).__name__}: {first[:160]}"
        raise ConfigError(f"checkpoint {path} cannot be read ({why}); delete it to start "
                          "over") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ConfigError(f"checkpoint {path} is not a metacl checkpoint of format "
                          f"{FORMAT_VERSION}; delete it to start over")
    return state


# ------------------------------------------------------------------------------ random states
def rng_state() -> dict:
    """Every global random state, as tensors and plain numbers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ config
def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def comparable_config(config: dict) -> dict:
    """The config as dotted keys, without the keys a resumed run may change (IGNORED_KEYS)."""
    return {k: v for k, v in _flatten(config).items()
            if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}


def config_hash(config: dict) -> str:
    text = json.dumps(comparable_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_diff(stored: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ (or exist on one side only), ignored keys left out."""
    a, b = comparable_config(stored), comparable_config(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<missing>") != b.get(k, "<missing>"))


def check_same_config(stored: dict, current: dict, force: bool, where: Path) -> list[str]:
    """Refuse to continue a run under a different config (unless forced); return the diff."""
    if config_hash(stored) == config_hash(current):
        return []
    diff = config_diff(stored, current)
    if not force:
        shown = ", ".join(f"{k} ({_get(stored, k)!r} -> {_get(current, k)!r})"
                          for k in diff[:8])
        more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
        raise ConfigError(f"resume: the config differs from the checkpoint in {where} at "
                          f"{shown}{more}; use the run's config, or resume.force=true to "
                          "continue anyway")
    return diff


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


# ------------------------------------------------------------------------------ method state
def optimizers_of(method) -> list:
    """The optimizers a method hands Lightning, then its LR schedulers (`([opts], [scheds])`):
    every object whose state_dict a checkpoint keeps. configure_optimizers must hand out the
    same objects on every call (created once, per the contract)."""
    found = method.configure_optimizers()
    if found is None:
        return []
    if isinstance(found, torch.optim.Optimizer):
        return [found]
    if isinstance(found, dict):
        found = [found]
    out = []
    for item in found:
        if isinstance(item, dict):
            item = item["optimizer"]
        if isinstance(item, list | tuple):
            out.extend(item)
        else:
            out.append(item)
    return out


def capture(method) -> dict:
    """The method's learnable and remembered state, its optimizers' state, the random state."""
    return {
        "method_state": {k: v.detach().clone() for k, v in method.state_dict().items()},
        "optimizer_states": [opt.state_dict() for opt in optimizers_of(method)],
        "rng": rng_state(),
    }


def restore(method, state: dict) -> None:
    method.load_state_dict(state["method_state"])
    optimizers = optimizers_of(method)
    if len(optimizers) != len(state["optimizer_states"]):
        raise ConfigError(f"checkpoint holds {len(state['optimizer_states'])} optimizer states, "
                          f"the method has {len(optimizers)}")
    for opt, opt_state in zip(optimizers, state["optimizer_states"]):
        opt.load_state_dict(opt_state)
    set_rng_state(state["rng"])


# ------------------------------------------------------------------------------ resume plan
@dataclass
class ResumePlan:
    out_dir: Path
    boundary: dict  # last.ckpt
    step: dict | None  # step.ckpt of the task in progress, if any
    config_diff: list[str]

    @property
    def finished(self) -> bool:
        return self.boundary["results"].get("status") == FINISHED


def resume_request(cfg) -> tuple[object, bool, bool | None]:
    """(path, force, auto) from `resume`, which may also be a bare value (`resume=true`)."""
    resume = cfg.get("resume")
    if resume is None or isinstance(resume, bool | str):
        return resume, False, None
    return resume.get("path"), bool(resume.get("force", False)), resume.get("auto")


def auto_resume_enabled(auto: bool | None) -> bool:
    """resume.auto: null means on inside a submitit job (SLURM requeues), off elsewhere."""
    if auto is None:
        return bool(os.environ.get("SUBMITIT_EXECUTOR"))
    return bool(auto)


def plan_resume(cfg, out_dir: Path, config: dict) -> ResumePlan | None:
    """Whether this run continues a checkpoint in `out_dir`, checked before any data loads.

    resume.path=true or <dir>: the folder must hold a checkpoint (the output folder already is
    that folder: see metacl.resolvers). resume.auto: continue if there is one, else start.
    """
    path, force, auto = resume_request(cfg)
    wanted = is_set(path)
    ckpt_dir = out_dir / "checkpoints"
    boundary_file = ckpt_dir / BOUNDARY_FILE
    if not boundary_file.is_file():
        if wanted:
            if str(path).lower() == "true":
                raise ConfigError(
                    f"resume.path=true: no checkpoint to resume in {out_dir} (no earlier run "
                    "with the same overrides holds checkpoints/last.ckpt); allowed: "
                    "resume.path=<run folder>, or hydra.run.dir=<run folder> resume=true")
            raise ConfigError(
                f"resume.path={path}: no checkpoint to resume there ({boundary_file} is "
                "missing); allowed: the folder of a run started with save_checkpoints=true")
        return None
    if not (wanted or auto_resume_enabled(auto)):
        return None
    boundary = load(boundary_file)
    diff = check_same_config(boundary["config"], config, force, out_dir)
    step = None
    step_file = ckpt_dir / STEP_FILE
    if step_file.is_file():
        candidate = load(step_file)
        if candidate["position"]["task"] == boundary["tasks_done"]:
            step = candidate  # inside the task that follows the boundary
    return ResumePlan(out_dir=out_dir, boundary=boundary, step=step, config_diff=diff)


# ------------------------------------------------------------------------------ signals
class Interrupted(BaseException):
    """A stop signal arrived; a checkpoint was saved (unless `saved` is False: the run had
    save_checkpoints=false). Exits with 128 + the signal number."""

    def __init__(self, signum: int, saved: bool = True):
        super().__init__(signum)
        self.signum, self.saved = signum, saved

    def __str__(self) -> str:
        what = ("a checkpoint was saved" if self.saved else
                "save_checkpoints=false, so there is no checkpoint to resume from")
        return f"stopped by {signal.Signals(self.signum).name}; {what}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# SIGUSR2 is submitit's pre-emption / time-out signal; we only take it over where a handler
# (submitit's) already exists, and hand it back after saving so submitit requeues the job.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR2")


class StopSignals:
    """Turns SIGINT/SIGTERM (and submitit's SIGUSR2) into a flag the loop checks after every
    batch, so the checkpoint is taken between two training steps, never inside one."""

    def __init__(self):
        self.pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be handled on the main thread
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if name == "SIGUSR2" and not callable(previous):
                continue  # not under submitit
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for a batch
        self.pending = signum

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def hand_over(self, signum: int) -> None:
        """After the checkpoint: let submitit requeue (its handler exits the process), or
        raise Interrupted for SIGINT/SIGTERM."""
        previous = self._previous.get(signum)
        if signum == getattr(signal, "SIGUSR2", None) and callable(previous):
            self.__exit__()
            previous(signum, None)
        raise Interrupted(signum)
