"""Evaluate a run's checkpoint again, without touching the run: `python eval.py run=<folder>`.

    python eval.py run=outputs/train/runs/<time>                       # as the run evaluated
    python eval.py run=<folder> dataset.limit_test_per_task=null       # every test sample
    python eval.py run=<folder> checkpoint=step                        # the in-task checkpoint

The method is rebuilt from the config stored in the checkpoint, its state loaded, and every
task's test set evaluated with the run's own Evaluator (task-aware, and task-agnostic on class
splits). Other `key=value` arguments override that config (the evaluation data: `dataset.*`;
`trainer.accelerator=cpu` to evaluate elsewhere); a key it does not have is refused in one line
as train.py refuses it (`+key=value` adds one, checked against the class as train.py does). The result goes to a new file in the run
folder, `eval-<overrides>.json`; `results.json` and the checkpoints are only read.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from metacl import checkpoint
from metacl.cli import unknown_eval_key
from metacl.errors import ConfigError
from metacl.runner.evaluator import Evaluator
from metacl.runner.record import atomic_write_text
from metacl.validate import check_group_keys

CHECKPOINTS = {"last": checkpoint.BOUNDARY_FILE, "step": checkpoint.STEP_FILE}


def parse_args(argv: list[str]) -> tuple[Path, str, list[str]]:
    """`run=<folder>` (required), `checkpoint=last|step`, the rest config overrides."""
    run, which, overrides = None, "last", []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg}: arguments are key=value (run=<run folder>, ...)")
        if key == "run":
            run = Path(value)
        elif key == "checkpoint":
            which = value
        else:
            overrides.append(arg)
    if run is None:
        raise ConfigError("name the run to evaluate: python eval.py run=<run folder>")
    if which not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={which}; allowed: {', '.join(CHECKPOINTS)}")
    return run, which, overrides


def output_path(run: Path, which: str, overrides: list[str]) -> Path:
    label = ",".join([*([] if which == "last" else [f"checkpoint={which}"]), *overrides])
    label = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", label)[:120] or "default"
    return run / f"eval-{label}.json"


def evaluate_run(run: Path, which: str = "last", overrides: list[str] = ()) -> dict:
    """Evaluate `run`'s checkpoint; returns what was written to `eval-<overrides>.json`."""
    from metacl.runner.session import Session

    path = run / "checkpoints" / CHECKPOINTS[which]
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: evaluate a run saved with "
                          "save_checkpoints=true")
    state = checkpoint.load(path)
    if state.get("kind") == "episodic":
        raise ConfigError(f"{run} is a few-shot run: its test episodes are in results.json")
    # A key the run's config does not have would end in the constructor's traceback: one
    # line instead, as train.py says it (`+key=value` adds one, checked as train.py does).
    problem = unknown_eval_key(state["config"], list(overrides))
    if problem:
        raise ConfigError(problem)
    cfg = OmegaConf.create(state["config"])
    cfg.pop("hydra", None)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    check_group_keys(cfg)
    session = Session(cfg, run)
    dm = instantiate(cfg.dataset).build().to(session.device)
    method = session.build_method(dm.task_info, task_info=dm.task_info)
    checkpoint.restore(method, state)
    tasks_done = int(state.get("tasks_done", state.get("position", {}).get("task", 0)))
    aware, agnostic = Evaluator(dm).accuracy(method, tasks_done)
    out = {
        "run": str(run), "checkpoint": str(path), "tasks_done": tasks_done,
        "overrides": list(overrides), "accuracy": aware, "accuracy_agnostic": agnostic,
        "mean_accuracy": sum(aware) / len(aware),
        "test_samples": [len(loader.y) for loader in dm.eval_dataloaders("test")],
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(output_path(run, which, list(overrides)), json.dumps(out, indent=2))
    return out


def main(argv: list[str]) -> int:
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        run, which, overrides = parse_args(argv)
        out = evaluate_run(run, which, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"mean accuracy {out['mean_accuracy']:.4f} over {len(out['accuracy'])} tasks "
          f"({out['tasks_done']} trained)\nwritten: "
          f"{output_path(run, which, overrides)}", file=sys.stderr)
    return 0
