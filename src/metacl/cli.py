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


def take_ctrl_c() -> None:
    """From here on Ctrl-C is a KeyboardInterrupt again, for the run's own stop handler and
    run_with_clean_errors (train.py exits at once on a Ctrl-C while Hydra composes)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


BETWEEN_JOBS_CTRL_C = ("stopped: interrupted by Ctrl-C between the jobs of a multirun; the "
                       "jobs that ended are complete in their folders, the next did not start")


def ctrl_c_between_jobs() -> None:
    """After a multirun job: a Ctrl-C before the next job takes it back (take_ctrl_c) stops the
    multirun with one line, exit 130. Hydra composes the next job's config in that gap, and a
    KeyboardInterrupt there could surface as a broken config or as "before the run started"."""
    import signal

    def stop(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110  (a closed stream: nothing to keep)
                pass
        os.write(2, (BETWEEN_JOBS_CTRL_C + "\n").encode())
        os._exit(EXIT_CTRL_C)

    signal.signal(signal.SIGINT, stop)


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


# ------------------------------------------------------------------ keys that do not exist
_NOT_THERE = object()
MAX_SWEEP_COMBINATIONS = 32  # group choices a multirun's key check composes at most


def _hydra_args(argv: list[str]):
    """Hydra's own reading of the command line, or None when the check does not apply (help,
    another config, a parse error: Hydra will say)."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:  # argparse would print it here too
        return None
    try:
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None
    if (args.help or args.hydra_help or args.shell_completion or args.info
            or args.experimental_rerun or args.config_path or args.config_name
            or args.config_dir):
        return None
    return args


def _lookup(container, key: str):
    """The value at a dotted key of a plain container, or _NOT_THERE (nothing is resolved)."""
    node = container
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _NOT_THERE
    return node


def _missing_key_line(container, key: str, line: str, choices: dict, delete: bool = False,
                      hint: str = "") -> str | None:
    """`method.lr: LaMAML (method=lamaml) has no key 'lr'; its keys: ...; to add ...`, or None
    when the key is there after all. `line` is the argument as given, `choices` the config
    groups' choices (to name `method=lamaml`)."""
    parts = key.split(".")
    parent, depth = container, 0  # the deepest node on the key's path that exists
    while depth < len(parts) and isinstance(parent, dict) and parts[depth] in parent:
        parent, depth = parent[parts[depth]], depth + 1
    if depth == len(parts):
        return None
    parent_key, missing = ".".join(parts[:depth]), parts[depth]
    rest = ".".join(parts[depth:])
    if isinstance(parent, dict) and depth + 1 < len(parts) and rest in parent and not delete:
        # a key with a dot in it (an Optuna search space's `method.lr`), which a dotted
        # override path reads as nested keys
        value = line.split("=", 1)[1] if "=" in line else "<value>"
        how = (f"give its search space as an argument of its own: {rest}={value}"
               if parent_key == "hydra.sweeper.params" else
               f"set the whole of '{parent_key}' instead")
        return (f"{key}: '{parent_key}' has '{rest}' as one key, with a dot in it, which an "
                f"override path reads as nested keys; {how}")
    if not isinstance(parent, dict):
        return (f"{key}: '{parent_key}' is a value ({parent!r}), not a group of keys; allowed: "
                f"{parent_key}=<value>")
    group = parent_key.replace(".", "/")
    if not parent_key:
        where = "the config"
    elif choices.get(group) is not None:
        target = parent.get("_target_")
        name = str(target).rsplit(".", 1)[-1] if target else parent_key
        where = f"{name} ({group}={choices[group]})"
    else:
        where = f"'{parent_key}'"
    keys = [str(k) for k in parent if not str(k).startswith("_")]
    shown = ", ".join(keys[:40]) + (", ..." if len(keys) > 40 else "")
    listed = f"its keys: {shown}" if keys else "it has no keys"
    if delete:
        return f"~{key}: {where} has no key '{missing}' to delete; {listed}"
    return f"{key}: {where} has no key '{missing}'; {listed}; to add a key use +{line}{hint}"


def _hydra_choices(container) -> dict:
    return (container.get("hydra") or {}).get("runtime", {}).get("choices") or {}


def unknown_eval_key(config: dict, args: list[str]) -> str | None:
    """eval.py's `key=value` arguments, merged over the config a run's checkpoint stores: one
    line, as train.py's (unknown_key), for a key that config does not have; `+key=value` adds
    one. `config` is the stored one, Hydra's choices under `hydra.choices`."""
    choices = (config.get("hydra") or {}).get("choices") or {}
    container = {k: v for k, v in config.items() if k != "hydra"}
    for arg in args:
        key = arg.split("=", 1)[0]
        if key.startswith("~"):
            return (f"{arg}: eval.py does not delete keys; allowed: key=value (a key of the "
                    "run's config) or +key=value (a new one)")
        if key.startswith("+"):
            continue
        line = _missing_key_line(container, key, arg, choices)
        if line is not None:
            return line
    return None


def _always_there(override, conf_dir: Path) -> bool:
    """A key of train.yaml's own body (seed, tags, resume.path, ...) or of conf/hydra/default.yaml
    (hydra.run.dir, ...): composing only adds keys, so it exists whatever the groups choose."""
    import yaml

    if override.is_delete():
        return False
    key, source = override.key_or_group, conf_dir / "train.yaml"
    if key.startswith("hydra."):
        key, source = key.removeprefix("hydra."), conf_dir / "hydra" / "default.yaml"
    try:
        body = yaml.safe_load(source.read_text()) or {}
    except Exception:  # noqa: BLE001
        return False
    body.pop("defaults", None)
    return _lookup(body, key) is not _NOT_THERE


def unknown_key(argv: list[str], conf_dir: Path) -> str | None:
    """One line for `key=value` overrides of keys the composed config does not have
    (`method.lr=0.5` under La-MAML, `model.foo=1`): Hydra's own message spans five lines and
    exits 1. Composes the config as Hydra will (Hydra's compose API, sweeps left out), then in a
    multirun once per combination of swept group choices, checking the swept keys too. Only
    Hydra's "Could not override/delete" errors are reported; anything else is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = _hydra_args(argv)
    if args is None:
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001  (a syntax error: Hydra's message names it)
        return None

    def is_group(o) -> bool:
        name = o.key_or_group
        return o.package is not None or "/" in name or (conf_dir / name).is_dir()

    keyed = [o for o in overrides if not is_group(o) and not (o.is_add() or o.is_force_add())]
    if all(_always_there(o, conf_dir) for o in keyed):
        return None  # nothing that could name a missing key: no composing (~0.4 s)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    key_sweeps = [o for o in keyed if o.is_sweep_override() and not o.is_delete()]
    group_sweeps = [o for o in overrides if o.is_sweep_override() and is_group(o)]
    if not group_sweeps:
        return _compose_problem(conf_dir, fixed, overrides, key_sweeps)

    # A multirun composes its base config with the default group choices and the overrides
    # that are not swept, then every job with its own choices: the same order here.
    swept = ", ".join(o.input_line for o in group_sweeps)
    problem = _compose_problem(conf_dir, fixed, overrides, [], swept)
    if problem:
        return problem
    combos: list[list[str]] = [[]]
    for o in group_sweeps:
        try:
            values = list(o.sweep_string_iterator())
        except Exception:  # noqa: BLE001  (glob and other sweeps: not expanded here)
            return None
        combos = [c + [f"{o.get_key_element()}={v}"] for c in combos for v in values]
        if len(combos) > MAX_SWEEP_COMBINATIONS:
            return None  # the jobs' own composition will tell
    for combo in combos:
        problem = _compose_problem(conf_dir, fixed + combo, overrides, key_sweeps)
        if problem:
            return problem
    return None


def _compose_problem(conf_dir: Path, lines: list[str], overrides, key_sweeps,
                     swept: str = "") -> str | None:
    """Compose `lines`; the one-line problem of a key Hydra could not override, else None."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    def composed(lines_):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3",
                                   job_name="train"):
            cfg = compose("train", overrides=lines_, return_hydra_config=True)
        return OmegaConf.to_container(cfg, resolve=False)

    first, remaining = None, list(lines)
    while True:  # drop the keys Hydra cannot override until the rest composes
        try:
            container = composed(remaining)
            break
        except ConfigCompositionException as err:
            text = str(err)
            if not (text.startswith("Could not override")
                    or text.startswith("Could not delete") and "does not exist" in text):
                return None  # another problem (such as ~key=<another value>): Hydra's message
            quoted = text.split("\n")[0]
            bad = next((o for o in overrides if f"'{o.key_or_group}'" in quoted
                        and o.input_line in remaining), None)
            if bad is None:
                return None
            first = first or bad
            remaining.remove(bad.input_line)
        except Exception:  # noqa: BLE001  (anything else: Hydra's message)
            return None
    if first is not None:
        hint = ""
        if swept:
            value = first.input_line.split("=", 1)[1]
            hint = (f" (a multirun applies keys that are not swept to the default choices "
                    f"before sweeping {swept}; to set it in every job, sweep it: "
                    f"{first.key_or_group}=choice({value}))")
        return _missing_key_line(container, first.key_or_group, first.input_line,
                                 _hydra_choices(container), first.is_delete(), hint)
    for o in key_sweeps:
        if _lookup(container, o.key_or_group) is _NOT_THERE:
            return _missing_key_line(container, o.key_or_group, o.input_line,
                                     _hydra_choices(container), o.is_delete())
    return None
