"""Turn user mistakes into one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from metacl.errors import MetaclError

EXIT_USER_ERROR = 2


def user_error(err: BaseException) -> MetaclError | None:
    """Our error, possibly wrapped by Hydra's instantiate (which re-raises with a cause)."""
    while err is not None:
        if isinstance(err, MetaclError):
            return err
        err = err.__cause__ or err.__context__
    return None


EXIT_CTRL_C = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


def _output_dir(args) -> Path | None:
    try:
        return Path(str(args[0].paths.output_dir))
    except Exception:  # noqa: BLE001  (not a run config: no folder to point at)
        return None


def ctrl_c_message(args) -> str:
    """A Ctrl-C that the run's stop handler did not turn into a checkpoint (it came before the
    handler was set, or a second one): point at the last checkpoint only if there is one."""
    out = _output_dir(args)
    saving = bool(args[0].get("save_checkpoints", True)) if out is not None else False
    if saving and (out / "checkpoints" / "last.ckpt").is_file():
        return (f"interrupted by Ctrl-C; resume from the last checkpoint with: python train.py "
                f"<same overrides> resume={out}")
    return "interrupted by Ctrl-C before any checkpoint was saved; nothing to resume"


def diverged_message(err: BaseException, args) -> str:
    out = _output_dir(args)
    where = f"; results.json says status: diverged ({out / 'results.json'})" if out else ""
    return (f"the run diverged: {err}{where}; allowed: a smaller learning rate or gradient "
            "clipping (method.lr, method.grad_clip_norm)")


def run_with_clean_errors(fn, *args):
    # Raised inside the Hydra task function: Hydra would print a traceback and exit 1 for any
    # Exception, but lets SystemExit through, so the user sees only our one line.
    from metacl.checkpoint import Interrupted
    from metacl.runner.health import DivergedError

    try:
        return fn(*args)
    except Interrupted as err:  # SIGINT/SIGTERM: the checkpoint is saved; 130 / 143
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # before the stop handler was set, or a second Ctrl-C
        print(f"stopped: {ctrl_c_message(args)}", file=sys.stderr)
        sys.exit(EXIT_CTRL_C)
    except Exception as err:
        found = user_error(err)
        if found is None and not isinstance(err, DivergedError):
            raise
        # A single run that diverged is recorded (status: diverged); its traceback says
        # nothing the line does not (a multirun records it and goes on: runner.main).
        line = str(found) if found is not None else diverged_message(err, args)
        print(f"error: {line}", file=sys.stderr)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # the traceback too, as Hydra does for its own errors
        sys.exit(EXIT_USER_ERROR)


def nested_groups(folder: Path) -> set[str]:
    """Subfolders that the group's own configs pick from in their defaults lists (such as
    dataset/source/): config groups of their own, not options of this one."""
    import yaml

    nested = set()
    for path in folder.glob("*.yaml"):
        for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
            if isinstance(entry, dict):
                nested.update(str(key).split("@")[0].lstrip("/") for key in entry)
    return {name for name in nested if (folder / name).is_dir()}


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_output(argv: list[str]) -> str | None:
    """One line when the folder Hydra is about to create cannot be written (a read-only file
    system, someone else's folder, a file in the way); Hydra's own error is a traceback from
    its log-file set-up. Interpolated parts (`${now:...}`) are left out of the check."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key, value = None, "outputs"  # conf/hydra/default.yaml: outputs/<task_name>/...
    for arg in argv:
        name, sep, given = arg.partition("=")
        name = name.lstrip("+~")
        wanted = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        resumed = name == "resume.path" and given.lower() not in ("true", "false", "null", "")
        if sep and (name == wanted or (resumed and key is None)):
            key, value = name, given
    folder = Path(value.split("${", 1)[0] or ".").expanduser()
    probe = _first_existing(folder.absolute())
    described = f"{key}={value}" if key else f"the output folder {folder.absolute()}"
    if not probe.is_dir():
        return (f"{described} cannot be created: {probe} is a file; allowed: a folder you can "
                "write to, e.g. hydra.run.dir=<dir>")
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"{described} is not writable ({probe} refuses writes); allowed: a folder you "
                "can write to, e.g. hydra.run.dir=<dir>")
    return None


def unknown_choice(argv: list[str], conf_dir: Path) -> str | None:
    """One line for `group=option` arguments naming an option that has no yaml (Hydra's own
    message spans a dozen lines), e.g. `method=foo is not an option; allowed: agem, ...`."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        group = key.lstrip("+~")
        folder = conf_dir / group
        if not sep or group.startswith("hydra") or not folder.is_dir() or "," in value:
            continue  # not a config group, or a multirun sweep over several options
        if value in ("null", "") or (folder / f"{value}.yaml").is_file():
            continue
        nested = nested_groups(folder)
        options = sorted(str(p.relative_to(folder).with_suffix(""))
                         for p in folder.rglob("*.yaml")
                         if p.relative_to(folder).parts[0] not in nested)
        shown = ", ".join(options[:30]) + (", ..." if len(options) > 30 else "")
        return f"{group}={value} is not an option of '{group}'; allowed: {shown}"
    return None


def bad_resume_path(argv: list[str]) -> str | None:
    """`resume.path=<dir>` (after expand_aliases) naming a folder that holds no checkpoint:
    one line before Hydra creates that folder (it is the run's output folder)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") != "resume.path":
            continue
        if value.lower() in ("true", "false", "null", "none", ""):
            return None
        ckpt = Path(value) / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            why = "does not exist" if not Path(value).exists() else f"holds no {ckpt.relative_to(value)}"
            return (f"resume.path={value}: {why}; allowed: the folder of a run started with "
                    "save_checkpoints=true, or resume=true (the latest run with these overrides)")
    return None
