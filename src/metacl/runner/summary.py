"""The end of a multirun: a table of its jobs' statuses, and a non-zero exit if any failed.

A Hydra callback (conf/hydra/default.yaml `callbacks`): `on_multirun_end` runs in the process
that launched the sweep, whatever the launcher (basic, joblib, submitit), after every job;
it reads each job's results.json below the sweep folder. train.py exits with 1 when
`failed_jobs` is not empty. In a hyperparameter search (`hparams_search=`), failed trials are
part of the search (the sweeper records them as failed and samples on): it fails only when no
trial completed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

failed_jobs: list[str] = []  # job folders of the last multirun that did not complete


def job_statuses(sweep_dir: Path) -> list[tuple[str, str]]:
    """(job folder relative to the sweep, status) for every results.json below it."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        try:
            status = str(json.loads(path.read_text()).get("status", "unknown"))
        except (OSError, ValueError):
            status = "unreadable results.json"
        rows.append((str(path.parent.relative_to(sweep_dir)), status))
    return rows


class MultirunSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = job_statuses(sweep_dir)
        failed = [job for job, status in rows if status != "completed"]
        search = config.hydra.runtime.choices.get("hparams_search")
        failed_jobs[:] = failed if not search or len(failed) == len(rows) else []
        if not rows:
            return
        width = max(len(job) for job, _ in rows)
        lines = [f"{'job':<{width}}  status", *(f"{job:<{width}}  {status.splitlines()[0][:100]}"
                                                for job, status in rows)]
        done = len(rows) - len(failed)
        lines.append(f"{done} of {len(rows)} jobs completed ({sweep_dir})")
        print("\n".join(lines), file=sys.stderr)
