"""Trainer settings: every key under `trainer` works or is refused in one line.

A run trains on one device; the runner builds a fresh `pl.Trainer` per task from `cfg.trainer`
plus the settings it owns itself (below). The run's device is the one Lightning's strategy picks
(`trainer.strategy.root_device`), so `devices: [1]` puts data, model and evaluation on `cuda:1`.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from metacl.errors import ConfigError

# Keys of cfg.trainer that are passed to pl.Trainer as they are.
SUPPORTED = ("accelerator", "devices", "max_epochs", "precision", "deterministic",
             "inference_mode", "benchmark", "detect_anomaly", "profiler", "default_root_dir",
             "log_every_n_steps")
# Keys the runner sets itself, and where to change what they do instead.
OWNED = {
    "callbacks": "add Lightning callbacks with the `callbacks` group (callbacks=lr_monitor or "
                 "+callbacks.<name>._target_=pkg.MyCallback; a schedule goes in `schedule`)",
    "logger": "choose the run's logger with the `logger` group (logger=wandb|csv|none)",
    "enable_checkpointing": "checkpoints are the runner's: save_checkpoints and "
                            "checkpoint.every_n_steps",
    "enable_progress_bar": "the runner draws its own progress bar",
    "enable_model_summary": "the runner sets it",
    "num_sanity_val_steps": "the runner sets it",
}
# Keys that manual optimization or one-device runs cannot honour.
REFUSED = {
    "gradient_clip_val": "methods optimize manually and clip inside their update: set "
                         "method.grad_clip_norm",
    "gradient_clip_algorithm": "set method.grad_clip_norm (methods clip inside their update)",
    "accumulate_grad_batches": "methods optimize manually; raise method.batch_size instead",
    "strategy": "a run uses one device; run jobs in parallel with a launcher instead "
                "(hydra/launcher=joblib or submitit_slurm, docs/sweeps.md)",
    "num_nodes": "a run uses one device; use hydra/launcher=submitit_slurm for many jobs",
}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# Lightning's spellings of each precision, folded onto the one methods declare.
PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true",
                     "32-true": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed",
                     "64-true": "64-true", "bf16-true": "bf16-true", "16-true": "16-true"}


def _devices_problem(devices) -> str | None:
    if isinstance(devices, int) and not isinstance(devices, bool):
        return None if devices == 1 else f"trainer.devices={devices}"
    if isinstance(devices, str):
        return None if devices.strip() in ("1", "auto") else f"trainer.devices={devices}"
    if isinstance(devices, list | tuple):
        ok = len(devices) == 1 and isinstance(devices[0], int) and devices[0] >= 0
        return None if ok else f"trainer.devices={list(devices)}"
    return f"trainer.devices={devices!r}"


def check_trainer(trainer: DictConfig, precisions: tuple[str, ...], method_name: str) -> None:
    """Refuse any trainer key the runner cannot honour, before anything is written."""
    for key in trainer:
        if key in REFUSED:
            raise ConfigError(f"trainer.{key} is not supported: {REFUSED[key]}")
        if key in OWNED:
            raise ConfigError(f"trainer.{key} is set by the runner: {OWNED[key]}")
        if key not in SUPPORTED:
            raise ConfigError(f"trainer.{key} is not a supported Trainer setting; allowed: "
                              f"{', '.join(SUPPORTED)}")
    accelerator = trainer.get("accelerator", "auto")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator} is not supported; allowed: "
                          "auto, cpu, gpu")
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices):
        devices = list(devices)
    bad = _devices_problem(devices)
    if bad:
        raise ConfigError(f"{bad} is not supported: a run uses one device; allowed: 1 or [k] "
                          "(GPU k); run jobs in parallel with hydra/launcher=joblib or "
                          "submitit_slurm (docs/sweeps.md)")
    if isinstance(devices, list) and accelerator == "cpu":
        raise ConfigError(f"trainer.devices={devices} picks a GPU but trainer.accelerator=cpu; "
                          "allowed on CPU: devices=1")
    precision = str(trainer.get("precision", "32-true"))
    unified = PRECISION_ALIASES.get(precision)
    if unified not in precisions:
        raise ConfigError(f"trainer.precision={precision} is not supported by {method_name}; "
                          f"allowed: {', '.join(precisions)}")


def _gpu_index(trainer: DictConfig) -> int | None:
    devices = trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return int(next(iter(devices)))
    return None


def trainer_kwargs(trainer: DictConfig) -> dict:
    """cfg.trainer as pl.Trainer keyword arguments (lists and dicts as plain containers)."""
    return OmegaConf.to_container(trainer, resolve=True) if OmegaConf.is_config(trainer) \
        else dict(trainer)


def build_trainer(trainer: DictConfig, callbacks: list, logger=False,
                  **overrides) -> pl.Trainer:
    """A fresh Trainer for one fit: the user's settings plus the runner's own. A profiler
    given as a config with `_target_` (debug=profile) is built here, one per fit."""
    settings = {**trainer_kwargs(trainer), **overrides}
    if isinstance(settings.get("profiler"), dict) and "_target_" in settings["profiler"]:
        from hydra.utils import instantiate

        settings["profiler"] = instantiate(settings["profiler"])
    return pl.Trainer(**settings, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks)


def auto_device(trainer: DictConfig, model: DictConfig | None,
                cuda_available: bool | None = None) -> tuple[DictConfig, str | None]:
    """`trainer.accelerator=auto` on a machine with CUDA: the backbone's `auto_device`.

    A backbone class answers `auto_device(model settings)` with "cpu" when a GPU cannot win
    for it (La-MAML's small MLP: issue #20 measured the default run at 43 s on an H200 against
    17-27 s on a 2-core CPU). Then auto trains on the CPU and says so; `trainer=gpu` (or
    `trainer.devices=[k]`) still uses the GPU. Returns the trainer settings to use and the
    note to print (None when nothing changed).
    """
    if trainer.get("accelerator", "auto") != "auto" or _gpu_index(trainer) is not None:
        return trainer, None
    if not (torch.cuda.is_available() if cuda_available is None else cuda_available):
        return trainer, None
    try:
        from hydra.utils import get_class

        settings = dict(OmegaConf.to_container(model, resolve=True))
        backbone = get_class(str(settings.pop("_target_")))
    except Exception:  # noqa: BLE001  (a bad _target_ is refused by validation, not here)
        return trainer, None
    chooser = getattr(backbone, "auto_device", None)
    if not callable(chooser) or chooser(settings) != "cpu":
        return trainer, None
    chosen = trainer.copy()
    chosen.accelerator = "cpu"
    note = (f"trainer.accelerator=auto: this {backbone.__name__} backbone trains faster on the "
            "CPU than on a GPU, so the run uses the CPU (trainer=gpu uses the GPU)")
    return chosen, note


def run_device(trainer: DictConfig) -> torch.device:
    """The device Lightning's strategy will train on (data and evaluation live there too)."""
    accelerator = trainer.get("accelerator", "auto")
    index = _gpu_index(trainer)
    if accelerator in ("gpu", "cuda") or index is not None:
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible; "
                              "use trainer=cpu or trainer.accelerator=auto")
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.devices=[{index}] but only "
                              f"{torch.cuda.device_count()} GPU(s) are visible; allowed: "
                              f"[0]..[{torch.cuda.device_count() - 1}]")
    probe = build_trainer(trainer, callbacks=[])
    return torch.device(probe.strategy.root_device)
