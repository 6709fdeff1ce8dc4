import time

from metacl import loggers
from metacl.loggers import CsvRunLogger, WandbRunLogger, resolve_wandb_mode


def test_wandb_mode_env_wins(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"


def test_wandb_auto_goes_offline_without_login_and_without_asking_the_network(monkeypatch,
                                                                              tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setattr(loggers, "_wandb_server_problem", lambda *a: (_ for _ in ()).throw(
        AssertionError("must not probe the network when not logged in")))
    assert resolve_wandb_mode("auto") == "offline"
    assert resolve_wandb_mode("online") == "online"  # an explicit choice is respected


def test_wandb_auto_goes_offline_when_the_server_is_unreachable(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: refused at once
    started = time.perf_counter()
    assert resolve_wandb_mode("auto") == "offline"
    assert time.perf_counter() - started < 5


def test_offline_wandb_run_is_written_locally_and_prints_sync_command(monkeypatch, tmp_path,
                                                                       capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    logger = WandbRunLogger(mode="auto")
    logger.start({"seed": 0}, str(tmp_path), "run", "sweep")
    logger.log_metrics({"train/loss": 1.0, "task": 0}, step=1)
    logger.finish({"RA": 0.5}, "completed")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    err = capsys.readouterr().err
    assert f"{loggers.wandb_command()} sync {runs[0]}" in err
    assert err.count(" sync ") == 1 and "wandb online" not in err


def test_csv_logger_writes_metrics(tmp_path):
    logger = CsvRunLogger()
    logger.start({"seed": 0}, str(tmp_path), "run", None)
    logger.log_metrics({"train/loss": 0.25, "task": 0}, step=3)
    logger.finish({"RA": 0.5}, "completed")
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in text and "0.25" in text and "final/RA" in text


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))


def test_wandb_run_has_rows_one_heatmap_long_matrix_table_summary_and_results_artifact(
        monkeypatch, tmp_path):
    import json

    from metacl.metrics import save_matrix_heatmap

    _offline(monkeypatch, tmp_path)
    out = tmp_path / "job"
    out.mkdir()
    logger = WandbRunLogger(tags=["paper"])
    logger.start({"seed": 0, "method": {"lr": 0.1}}, str(out), "er-rot-seed0-method.lr=0.1",
                 "train-sweep42", tags=["er", "mnist_rotations"], job_type="sweep")
    R = [[0.9, 0.2], [0.7, 0.8]]
    for t in range(2):
        logger.log_task(t, R[t], {"test/RA": sum(R[t]) / 2, "val/RA": 0.5}, 10 * (t + 1))
    save_matrix_heatmap(R, out / "accuracy_matrix.png")
    results = out / "results.json"
    results.write_text(json.dumps({"status": "completed", "accuracy_matrix": R}))
    logger.log_matrix(R, str(out / "accuracy_matrix.png"), 20)
    logger.finish({"RA": 0.75, "val/RA": 0.5}, "completed", files=[str(results)])
    import wandb

    wandb.teardown()  # the W&B service flushes the run file when it stops (at exit in a job)

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    (table,) = (media / "table").glob("accuracy_matrix_*.table.json")
    table = json.loads(table.read_text())
    assert table["columns"] == ["after_task", "task", "accuracy"]  # long format
    assert table["data"] == [[0, 0, 0.9], [0, 1, 0.2], [1, 0, 0.7], [1, 1, 0.8]]
    assert not list((media / "images").glob("accuracy_heatmap_*.png"))  # none per task
    assert len(list((media / "images").glob("accuracy_matrix_heatmap_*.png"))) == 1
    (log,) = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    for text in ("er-rot-seed0-method.lr=0.1", "train-sweep42", "sweep", "paper",
                 "mnist_rotations", "acc/task_1", "val/RA", "completed",
                 f"results-{run_dir.name.rsplit('-', 1)[1]}"):
        assert text.encode() in data, text


def test_each_job_in_one_process_gets_its_own_finished_run(monkeypatch, tmp_path):
    import wandb

    _offline(monkeypatch, tmp_path)
    for job in ("job0", "job1"):  # e.g. two trials of an in-process Optuna search
        logger = WandbRunLogger()
        logger.start({"job": job}, str(tmp_path / job), job, "sweep")
        logger.finish({"RA": 0.5}, "completed")
        assert wandb.run is None  # finished before the next job starts
    runs = [next((tmp_path / job / "wandb").glob("offline-run-*")).name
            for job in ("job0", "job1")]
    assert runs[0] != runs[1]


def test_csv_logger_writes_the_accuracy_row_and_metrics_so_far(tmp_path):
    logger = CsvRunLogger()
    logger.start({"seed": 0}, str(tmp_path), "run", None)
    logger.log_task(1, [0.5, 0.75], {"test/RA": 0.625}, step=8)
    logger.finish({"RA": 0.625, "status_note": "text is skipped"}, "completed")
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "acc/task_1" in text and "test/RA" in text and "acc/mean_seen" in text
    assert "status_note" not in text
