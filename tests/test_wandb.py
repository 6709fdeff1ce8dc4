"""W&B as its users expect, checked on offline runs by decoding their files (tests/wandb_files):
one run per job that a resume continues, groups without the seed, the matrix as a long table
with one heatmap, timing and git state, the final checkpoint as an artifact, a failing server
that sends the run offline with one line, and one sync hint that works as printed."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from metacl import loggers
from metacl.checkpoint import Interrupted
from metacl.runner.callbacks import InTaskCheckpoints
from metacl.runner.job import config_group
from metacl.runner.main import main as run_main

from .conftest import ROOT
from .wandb_files import config, of_type, offline_runs, records, summary

TINY = ["debug=fast", "logger=wandb", "method=er", "dataset.limit_train_per_task=20",
        "method.batch_size=10"]  # 2 tasks of 2 batches


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_DIR", "dir")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_run_logs_one_long_table_one_heatmap_timing_and_git_state(compose, tmp_path, offline):
    out = tmp_path / "run"
    cfg = compose([*TINY, f"paths.output_dir={out}", "tags=[paper,table2]"])
    run_main(cfg)
    results = _results(out)
    (run_dir,) = offline_runs(out)
    recs = records(run_dir)
    (run,) = of_type(recs, "run")
    assert run["run_id"] == results["logger"]["run_id"]  # kept for a resume
    assert run["run_group"] == config_group(cfg, None, None) and "seed" not in run["run_group"]
    assert {"paper", "table2"} <= set(run["tags"])
    media = run_dir / "files" / "media"
    # one heatmap at the end, not one per task
    assert [p.name.split("_heatmap")[0] for p in (media / "images").glob("*.png")] == [
        "accuracy_matrix"]
    (table,) = (media / "table").glob("accuracy_matrix_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["after_task", "task", "accuracy"]
    R = results["accuracy_matrix"]
    assert table["data"] == [[t, u, a] for t, row in enumerate(R) for u, a in enumerate(row)]
    final = summary(recs)
    assert final["RA"] == results["metrics"]["RA"] and final["status"] == "completed"
    assert final["task_train_seconds"] == results["timing"]["task_train_seconds"]
    assert len(final["task_train_seconds"]) == 2 and "time/train_seconds" in final
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert config(recs)["git"]["commit"] == head and "dirty" in config(recs)["git"]
    assert of_type(recs, "exit")[-1]["exit_code"] == 0


def test_each_population_member_logs_its_own_run(tmp_path, offline):
    """A population keeps its members' runs open side by side in one process: each member
    gets its own W&B run (wandb's default handed the second member the first one's run, which
    the first then finished, and the second member failed)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", "seed=0,1", *TINY,
                           "hydra/launcher=population", "hydra.sweep.dir=pop"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "population of 2 jobs" in proc.stderr
    ids = []
    for k in range(2):
        (member,) = (tmp_path / "pop").glob(f"{k}_*")
        results = _results(member)
        assert results["status"] == "completed"
        (run_dir,) = offline_runs(member)
        recs = records(run_dir)
        (run,) = of_type(recs, "run")
        assert run["run_id"] == results["logger"]["run_id"]
        final = summary(recs)
        assert final["status"] == "completed" and final["RA"] == results["metrics"]["RA"]
        assert config(recs)["seed"] == k
        ids.append(run["run_id"])
    assert ids[0] != ids[1]


def test_seeds_of_one_configuration_share_a_group(compose):
    def group(*overrides):
        return config_group(compose(["method=er", *overrides]), "er", "mnist_rotations")

    assert group("seed=0") == group("seed=1") == group("seed=2", "logger=csv")
    assert group("seed=0") != group("seed=0", "method.lr=0.5")
    assert group("seed=0").startswith("er-mnist_rotations-")


def _stop_at(monkeypatch, at_step: int):
    original = InTaskCheckpoints.__call__

    def call(self, stream, trainer, pl_module, batch_idx):
        if stream.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, stream, trainer, pl_module, batch_idx)

    monkeypatch.setattr(InTaskCheckpoints, "__call__", call)
    return original


def test_a_resumed_run_goes_on_in_the_same_wandb_run(compose, tmp_path, offline, monkeypatch):
    """SIGTERM in task 1: the W&B run is marked preempting (resumable) with the signal's exit
    code, not failed; resume=true writes to the same run id."""
    out = tmp_path / "run"
    common = [*TINY, f"paths.output_dir={out}", "checkpoint.every_n_steps=1"]
    original = _stop_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        run_main(compose(common))
    monkeypatch.setattr(InTaskCheckpoints, "__call__", original)
    run_main(compose([*common, "resume.path=true"]))
    first, second = offline_runs(out)
    stopped, resumed = records(first), records(second)
    run_id = _results(out)["logger"]["run_id"]
    assert [r["run_id"] for r in of_type(stopped + resumed, "run")] == [run_id, run_id]
    assert of_type(stopped, "preempting")
    assert of_type(stopped, "exit")[-1]["exit_code"] == 128 + signal.SIGTERM
    assert summary(stopped)["status"] == "interrupted"
    assert of_type(resumed, "exit")[-1]["exit_code"] == 0
    # W&B's step is the run's batch step: the resumed part's rows come after the first's
    steps = [[h["step"]["num"] for h in of_type(part, "history")] for part in (stopped, resumed)]
    assert steps[0] and steps[1] and max(steps[0]) < min(steps[1])
    assert summary(resumed)["status"] == "completed"
    assert not of_type(resumed, "preempting")


def test_log_model_uploads_the_final_checkpoint(compose, tmp_path, offline):
    kinds = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        run_main(compose([*TINY, f"paths.output_dir={out}", f"logger.log_model={flag}"]))
        (run_dir,) = offline_runs(out)
        kinds[flag] = [a["type"] for a in of_type(records(run_dir), "artifact")]
    assert "model" not in kinds["false"] and "results" in kinds["false"]
    assert kinds["true"].count("model") == 1


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(502)
        self.end_headers()
        self.wfile.write(b"bad gateway")

    def log_message(self, *args):
        pass


def _serve(handler):
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_server_that_accepts_and_then_fails_sends_the_run_offline(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    server = _serve(_Failing)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
    started = time.perf_counter()
    try:
        assert loggers.resolve_wandb_mode("auto") == "offline"
    finally:
        server.shutdown()
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 502" in err[0] and "offline" in err[0]

    # a server that accepts the connection and closes it without a word
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up():
        conn, _ = listener.accept()
        conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert loggers.resolve_wandb_mode("auto") == "offline"
    listener.close()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_online_start_that_fails_goes_on_offline(monkeypatch, tmp_path, offline, capsys):
    import wandb

    real_init = wandb.init

    def init(**kwargs):
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("proxy said no")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    run, mode = loggers._init_run({"project": "metacl", "dir": str(tmp_path)}, "online")
    run.finish()
    assert mode == "offline"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "proxy said no" in line and "offline" in line


def test_one_sync_hint_that_works_as_printed_and_no_wandb_online(tmp_path):
    """Not logged in, venv not on the PATH: one line says why the run is offline, one line
    gives a sync command that runs as printed from another folder; nothing says `wandb
    online`."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PATH="/usr/bin:/bin", PYTHONPATH=str(ROOT / "src"),
               WANDB_CONFIG_DIR=str(home / "wandb"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "wandb online" not in text
    hints = [line for line in text.splitlines() if " sync " in line]
    assert len(hints) == 1 and "not logged in" in text
    command = hints[0].split("upload with: ", 1)[1]
    other = tmp_path / "elsewhere"
    other.mkdir()
    check = subprocess.run(f"{command} --dry-run", shell=True, cwd=other, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr
    assert "Would sync 1 run" in check.stdout + check.stderr


def test_prewarm_starts_wandb_only_for_a_wandb_logger_that_is_not_disabled(monkeypatch,
                                                                           offline):
    from omegaconf import OmegaConf

    monkeypatch.setattr(loggers, "_prewarm", None)
    loggers.prewarm(OmegaConf.create({"_target_": "metacl.loggers.NullRunLogger"}))
    assert loggers._prewarm is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers.prewarm(OmegaConf.create({"_target_": "metacl.loggers.WandbRunLogger"}))
    assert loggers._prewarm is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers.prewarm(OmegaConf.create({"_target_": "metacl.loggers.WandbRunLogger",
                                      "mode": "auto"}))
    assert loggers._prewarm is not None
    loggers._prewarm.join(timeout=60)
    assert not loggers._prewarm.is_alive() and "wandb" in sys.modules
