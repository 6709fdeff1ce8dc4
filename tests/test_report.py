"""`python -m metacl.report` on hand-made results.json files: grouping, mean ± CI, failed jobs."""

import csv
import json
import math

import numpy as np
import pytest

from metacl.metrics import compute_metrics
from metacl.report import build_report, load_published, main, mean_ci, t95


def _matrix(n_tasks: int, final: float) -> list[list[float]]:
    """A lower-triangular-ish matrix whose last row averages to `final`."""
    R = np.full((n_tasks, n_tasks), 0.1)
    for t in range(n_tasks):
        R[t, : t + 1] = final
    return R.tolist()


def _write(root, name, *, dataset="cifar100", method="er", seed=0, ra=0.5, lr=0.03,
           n_epochs=1, n_tasks=20, status="completed", model="pc_cnn", hydra=True, extra=None,
           method_keys=None):
    R = _matrix(n_tasks, ra)
    before = [0.1] * n_tasks
    config = {
        "seed": seed,
        "dataset": {"_target_": "metacl.data.datamodule.ContinualDataModule",
                    "source": dataset if dataset != "mnist_rotations" else "bundled",
                    "scenario": "class_split" if dataset != "mnist_rotations" else dataset,
                    "seed": seed, "data_dir": f"/data/{seed}", "n_tasks": n_tasks},
        "model": {"_target_": f"metacl.models.backbones.{model}"},
        "method": {"_target_": f"metacl.methods.{method}.{method.upper()}", "lr": lr,
                   "n_epochs": n_epochs, "batch_size": 10, **(method_keys or {})},
        "paths": {"output_dir": str(root / name)},
    }
    if hydra:
        config["hydra"] = {"choices": {"dataset": dataset, "method": method, "model": model},
                           "overrides": [f"seed={seed}", f"method.lr={lr}"]}
    results = {"config": config, "accuracy_matrix": R, "accuracy_matrix_agnostic": None,
               "accuracy_before": before, "metrics": compute_metrics(R, before),
               "timing": {"train_seconds": 1.0, "total_seconds": 2.0}, "status": status}
    results.update(extra or {})
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, ra in enumerate([0.50, 0.52, 0.54]):  # mean 52, sd 2
        _write(root, f"{seed}_lr=0.03,seed={seed}", seed=seed, ra=ra, lr=0.03)
    for seed, ra in enumerate([0.40, 0.44]):
        _write(root, f"{3 + seed}_lr=0.1,seed={seed}", seed=seed, ra=ra, lr=0.1)
    _write(root, "5_lr=0.03,seed=3", seed=3, ra=0.99, lr=0.03,
           status="failed: DivergedError: training loss became nan in task 3 (batch 40)")
    _write(root, "6_lr=0.03,seed=4", seed=4, ra=0.98, lr=0.03, status="running")
    _write(root, "7_lamaml", dataset="mnist_rotations", method="lamaml", n_tasks=3, ra=0.7)
    # W&B's own copies never count as runs
    (root / "7_lamaml" / "wandb" / "files").mkdir(parents=True)
    (root / "7_lamaml" / "wandb" / "files" / "results.json").write_text("{}")
    return root


def test_t_quantiles_and_mean_ci():
    assert t95(1) == pytest.approx(12.706, abs=1e-3) and t95(2) == pytest.approx(4.303, abs=1e-3)
    assert t95(100) == pytest.approx(1.984, abs=1e-3)  # exact, not a table's next lower df
    assert t95(10_000) == pytest.approx(1.960, abs=1e-3)
    mean, ci, n = mean_ci([50.0, 52.0, 54.0])
    assert (mean, n) == (52.0, 3)
    assert ci == pytest.approx(4.303 * 2.0 / math.sqrt(3), abs=1e-3)
    assert mean_ci([61.0]) == (61.0, None, 1)
    assert mean_ci([1.0, float("nan"), 3.0])[2] == 2  # NaN never enters a mean


def test_report_groups_by_distinguishing_settings_and_averages_seeds(sweep, tmp_path):
    report = build_report([sweep], tmp_path / "out", latex_table=True)
    cells = {(c.dataset, c.method, c.label): c for c in report.cells}
    assert set(cells) == {("cifar100", "er", "method.lr=0.03"),
                          ("cifar100", "er", "method.lr=0.1"),
                          ("mnist_rotations", "lamaml", "")}
    low = cells[("cifar100", "er", "method.lr=0.03")]
    assert len(low.runs) == 3 and low.seeds == ["0", "1", "2"]
    mean, ci, n = low.stats["RA"]
    assert mean == pytest.approx(52.0) and n == 3
    assert ci == pytest.approx(4.303 * 2.0 / math.sqrt(3), abs=1e-3)
    high = cells[("cifar100", "er", "method.lr=0.1")]
    assert high.stats["RA"][0] == pytest.approx(42.0)
    assert high.stats["RA"][1] == pytest.approx(12.706 * np.std([40, 44], ddof=1) / math.sqrt(2),
                                                abs=1e-2)
    assert set(low.stats) == {"RA", "BTI", "ACC", "BWT", "FWT", "forgetting"}
    assert report.columns == ["RA", "BTI", "ACC", "BWT", "FWT", "forgetting"]
    # data_dir and the seeds differ between runs but never split a cell
    assert "data_dir" not in low.label and "seed" not in low.label


def test_failed_and_unfinished_runs_are_listed_not_averaged(sweep, tmp_path):
    report = build_report([sweep], tmp_path / "out")
    assert sorted(r.status.split(":")[0] for r in report.failed) == ["failed", "running"]
    low = next(c for c in report.cells if c.label == "method.lr=0.03")
    assert all(r.ok for r in low.runs) and low.stats["RA"][0] == pytest.approx(52.0)
    text = report.markdown
    assert "Failed or unfinished jobs (2, not averaged)" in text
    assert "5_lr=0.03,seed=3" in text and "DivergedError" in text
    assert "6_lr=0.03,seed=4" in text and "running" in text


def test_a_damaged_results_json_is_skipped_with_a_warning(sweep, tmp_path, capsys):
    whole = build_report([sweep], tmp_path / "whole", plots=False)
    damaged = sweep / "1_lr=0.03,seed=1" / "results.json"
    damaged.write_text(damaged.read_text()[:150])  # a copy cut short
    (sweep / "8_empty").mkdir()
    (sweep / "8_empty" / "results.json").write_text("")
    (sweep / "9_list").mkdir()
    (sweep / "9_list" / "results.json").write_text("[1, 2]")
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    err = capsys.readouterr().err
    for name in (damaged, sweep / "8_empty" / "results.json", sweep / "9_list" / "results.json"):
        assert f"warning: skipped {name}" in err
    report = build_report([sweep], tmp_path / "out2", plots=False)
    low = next(c for c in report.cells if c.label == "method.lr=0.03")
    assert len(low.runs) == 2 and low.stats["RA"][0] == pytest.approx(52.0)  # seeds 0 and 2
    assert len(report.cells) == len(whole.cells)


def test_published_numbers_match_dataset_method_and_passes(sweep, tmp_path):
    report = build_report([sweep], tmp_path / "out")
    low = next(c for c in report.cells if c.label == "method.lr=0.03")
    assert low.published["RA"] == 47.88 and low.published["source"] == "lamaml2020"
    lamaml = next(c for c in report.cells if c.method == "lamaml")
    assert lamaml.published is None  # no published rotated-MNIST row
    assert "| 47.88 [1] |" in report.markdown and "La-MAML" in report.markdown

    multi = tmp_path / "multi"
    _write(multi, "a", method="er", n_epochs=10, ra=0.6)
    # La-MAML with learned learning rates, and C-MAML (La-MAML without them)
    _write(multi, "b", method="lamaml", n_epochs=10, ra=0.7, method_keys={"learn_lr": True})
    _write(multi, "c", method="lamaml", n_epochs=10, ra=0.6, method_keys={"learn_lr": False})
    report = build_report([multi], tmp_path / "out2")
    published = {(c.method, c.runs[0].config["method"].get("learn_lr")): c.published["RA"]
                 for c in report.cells}
    assert published == {("er", None): 59.70, ("lamaml", True): 70.08, ("lamaml", False): 65.44}

    short = tmp_path / "short"  # a 2-task debug run never matches a 20-task paper number
    _write(short, "a", n_tasks=2)
    assert build_report([short], tmp_path / "out3").cells[0].published is None


def test_published_file_has_a_source_for_every_row():
    published = load_published()
    assert published["results"]
    for row in published["results"]:
        assert row["source"] in published["sources"]
        assert row["passes"] in ("single", "multi")
    cells = {(r["dataset"], str(r["method"]), r["passes"]): r["RA"] for r in published["results"]}
    assert cells[("cifar100", "lamaml", "single")] == 61.18
    assert cells[("tinyimagenet", "['cmaml', 'lamaml']", "multi")] == 61.93
    assert cells[("tinyimagenet", "mer", "single")] == 44.87


def test_names_fall_back_to_the_config_without_hydra_choices(tmp_path):
    _write(tmp_path / "runs", "a", method="gem", hydra=False)
    _write(tmp_path / "runs", "b", method="gem", hydra=False, seed=1)
    (cell,) = build_report([tmp_path / "runs"], tmp_path / "out").cells
    assert (cell.dataset, cell.method, len(cell.runs)) == ("cifar100", "gem", 2)


def test_fewshot_accuracy_column_appears_where_present(tmp_path):
    root = tmp_path / "fs"
    for seed, acc in enumerate([0.9, 0.92]):
        _write(root, f"fs{seed}", dataset="omniglot", method="maml", seed=seed, n_tasks=1,
               extra={"metrics": {"test_acc": acc}})
    _write(root, "cl", seed=0)
    report = build_report([root], tmp_path / "out")
    assert "test_acc" in report.columns
    maml = next(c for c in report.cells if c.method == "maml")
    assert maml.stats["test_acc"][0] == pytest.approx(91.0)
    assert "RA" not in maml.stats


def test_cli_prints_and_writes_markdown_csv_latex_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--latex"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Results") and "52.00 ± 4.97" in printed
    assert (out / "report.md").read_text() == printed.rstrip("\n") + "\n"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 3
    low = next(r for r in rows if r["settings"] == "method.lr=0.03")
    assert float(low["RA"]) == pytest.approx(52.0) and low["n"] == "3"
    assert float(low["RA_ci95"]) == pytest.approx(4.969, abs=1e-3)
    assert low["published_RA"] == "47.88" and low["seeds"] == "0 1 2"
    tex = (out / "report.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$52.00 \pm 4.97$" in tex and r"mnist\_rotations" in tex
    for png in ("final_accuracy.png", "accuracy_over_tasks.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert main([str(tmp_path / "missing")]) == 2
