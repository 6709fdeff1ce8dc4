"""Where a run's output folder is, including when it continues an earlier run.

`conf/hydra/default.yaml` sets `hydra.run.dir: ${metacl.run_dir:...}`, so Hydra itself puts a
resumed run (its log, its .hydra/ record) in the folder it continues:

`outputs/` is under `paths.root_dir` (default `${metacl.project_root:}`: the checkout, wherever
the command is started from; `METACL_ROOT_DIR` overrides it).

- `resume.path` null/false: a new folder, `outputs/<task_name>/runs/<time>` (unchanged);
- `resume.path=<dir>`: that folder;
- `resume.path=true`: the latest folder under `outputs/<task_name>/runs/` whose recorded
  overrides (`.hydra/overrides.yaml`, `resume.*` left out) are this command's and which holds a
  checkpoint; a new folder if there is none (the run then stops with a message saying so).
  An explicit `hydra.run.dir=...` on the command line wins over all of this.

Light on purpose (no torch): train.py imports it before Hydra composes the config.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import OmegaConf

ALIASES = {"resume": "resume.path"}  # `resume=X` on the command line means `resume.path=X`


def expand_aliases(argv: list[str]) -> list[str]:
    """`resume=true` -> `resume.path=true` (the config node `resume` is a group of keys)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        bare = key.lstrip("+~")
        if sep and bare in ALIASES:
            arg = f"{key[: len(key) - len(bare)]}{ALIASES[bare]}={value}"
        out.append(arg)
    return out


def _comparable(overrides) -> list[str]:
    return sorted(str(o) for o in overrides
                  if not str(o).lstrip("+~").startswith(("resume.", "resume=")))


def is_set(path) -> bool:
    return path is not None and str(path).lower() not in ("false", "null", "none", "")


def latest_matching_run(runs_root: Path, overrides) -> Path | None:
    """The newest run folder with a checkpoint whose overrides equal `overrides`."""
    wanted = _comparable(overrides)
    if not runs_root.is_dir():
        return None
    for run in sorted((p for p in runs_root.iterdir() if p.is_dir()), reverse=True):
        recorded = run / ".hydra" / "overrides.yaml"
        if not (run / "checkpoints" / "last.ckpt").is_file() or not recorded.is_file():
            continue
        try:
            if _comparable(yaml.safe_load(recorded.read_text()) or []) == wanted:
                return run
        except (OSError, yaml.YAMLError):
            continue
    return None


def run_dir(resume_path, new_dir: str, runs_root: str, overrides) -> str:
    if not is_set(resume_path):
        return new_dir
    if str(resume_path).lower() == "true":
        found = latest_matching_run(Path(runs_root), list(overrides or []))
        return str(found) if found is not None else new_dir
    return str(resume_path)


# A folder name may hold 255 bytes on the usual file systems; a job's name comes from its
# overrides, which a sweep over long values (lists, paths) easily makes longer.
NAME_BYTES = 200


def folder_name(name) -> str:
    """`name` as it is when short enough, else its first bytes plus a hash of all of it (the
    full overrides stay in the job's .hydra/overrides.yaml and results.json)."""
    import hashlib

    name = str(name)
    raw = name.encode()
    if len(raw) <= NAME_BYTES:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[: NAME_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


def project_root() -> str:
    """Where outputs/ goes: $METACL_ROOT_DIR if set, else the checkout that holds train.py and
    conf/ (so runs land in the project's outputs/ wherever the command is started from), else
    the current folder (an installed package without a checkout)."""
    if os.environ.get("METACL_ROOT_DIR"):
        return os.environ["METACL_ROOT_DIR"]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "conf" / "train.yaml").is_file():
        return str(checkout)
    return os.getcwd()


def register() -> None:
    if not OmegaConf.has_resolver("metacl.run_dir"):
        OmegaConf.register_new_resolver("metacl.run_dir", run_dir)
    if not OmegaConf.has_resolver("metacl.folder_name"):
        OmegaConf.register_new_resolver("metacl.folder_name", folder_name)
    if not OmegaConf.has_resolver("metacl.project_root"):
        OmegaConf.register_new_resolver("metacl.project_root", project_root)
