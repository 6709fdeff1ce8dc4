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
    monkeypatch.setattr(loggers, "_wandb_reachable", lambda *a: (_ for _ in ()).throw(
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
    assert f"wandb sync {runs[0]}" in capsys.readouterr().err


def test_csv_logger_writes_metrics(tmp_path):
    logger = CsvRunLogger()
    logger.start({"seed": 0}, str(tmp_path), "run", None)
    logger.log_metrics({"train/loss": 0.25, "task": 0}, step=3)
    logger.finish({"RA": 0.5}, "completed")
    text = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/loss" in text and "0.25" in text and "final/RA" in text
