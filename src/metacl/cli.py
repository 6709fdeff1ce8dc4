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


def run_with_clean_errors(fn, *args):
    # Raised inside the Hydra task function: Hydra would print a traceback and exit 1 for any
    # Exception, but lets SystemExit through, so the user sees only our one line.
    from metacl.checkpoint import Interrupted

    try:
        return fn(*args)
    except Interrupted as err:  # SIGINT/SIGTERM: the checkpoint is saved; 130 / 143
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
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
