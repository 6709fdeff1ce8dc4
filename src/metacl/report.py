"""Tables and plots over many runs: `python -m metacl.report <sweep or output dirs...>`.

Reads every results.json below the given folders and groups the finished runs into cells:
one per (dataset, method, distinguishing settings), where the settings are the method / model /
dataset config values that differ between runs of the same dataset and method (seeds, paths and
other bookkeeping keys never distinguish). Each cell shows every metric as mean ± 95% confidence
interval over its runs (Student's t), the number of runs, and the published figure for that cell
from `metacl/published.yaml`. Runs that failed or never finished are listed, never averaged.

Writes report.md, report.csv (optionally report.tex), final_accuracy.png (bars with CIs) and
accuracy_over_tasks.png (mean accuracy over the tasks seen so far, per cell), and prints the
Markdown. All numbers are in percent, as papers print them.

Forgetting ratio (HAT, Serra et al. 2018): when the folders also hold finished runs of
`method=random` and `method=joint` with the same dataset config and seed as a run, the run gets
rho_u = (A_u - A_random,u) / (A_joint,u - A_random,u) - 1 for every task u, where A_u is the
run's final accuracy on task u (the last row of its matrix), and `rho` = the mean over tasks
(tasks where joint and random tie are left out). rho = 0 matches joint training, -1 is no better
than the untrained network; it is reported (not in percent) with its 95% CI over seeds, and the
per-task means are listed below the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from metacl.runner.record import RunRecord

METRICS = ("RA", "BTI", "ACC", "BWT", "FWT", "forgetting", "rho")
# Metrics reported as they are (ratios), not as percentages.
RATIO_METRICS = ("rho",)
# The reference runs of the forgetting ratio (method config names).
RANDOM_METHOD, JOINT_METHOD = "random", "joint"
FEWSHOT_METRICS = ("test_acc",)
# Config leaves that never make two runs different experiments.
IGNORED_LEAVES = {"seed", "data_dir", "download", "verify_checksums", "verify_md5",
                  "eval_batch_size", "_partial_"}
COMPARED_SUBTREES = ("method", "model", "dataset")

def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile for `df` degrees of freedom (scipy.stats.t)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    from scipy.stats import t  # imported here: the report's only use of scipy

    return float(t.ppf(0.975, df))


def mean_ci(values) -> tuple[float, float | None, int]:
    """(mean, half-width of the 95% CI or None for a single value, n)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), None, 0
    if n == 1:
        return float(x[0]), None, 1
    return float(x.mean()), float(t95(n - 1) * x.std(ddof=1) / math.sqrt(n)), n


# ------------------------------------------------------------------------------- loading runs
@dataclass
class Run:
    path: Path
    status: str
    dataset: str
    method: str
    seed: object
    config: dict
    metrics: dict  # fractions, as in results.json
    matrix: list
    settings: dict = field(default_factory=dict)  # leaf -> value, for comparison
    rho_per_task: list | None = None  # forgetting ratio of each task, when references exist

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def n_tasks(self) -> int:
        return len(self.matrix)

    @property
    def n_epochs(self):
        return (self.config.get("method") or {}).get("n_epochs")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _node_name(node):
    """A dataset's source or scenario by name: the loader/builder its node targets
    (`metacl.data.sources.load_cifar100` -> cifar100), or the string older runs recorded."""
    if isinstance(node, dict):
        return str(node.get("_target_", "")).rsplit(".", 1)[-1].removeprefix("load_") or None
    return node


def _names(config: dict) -> tuple[str, str]:
    """(dataset, method) config names: Hydra's choices when recorded, else guessed."""
    choices = (config.get("hydra") or {}).get("choices") or {}
    dataset_cfg = config.get("dataset") or {}
    dataset = choices.get("dataset")
    if not dataset:
        source, scenario = (_node_name(dataset_cfg.get(k)) for k in ("source", "scenario"))
        dataset = source if scenario in (None, "class_split") else scenario
    method = choices.get("method")
    if not method:
        target = str((config.get("method") or {}).get("_target_", "unknown"))
        method = target.rsplit(".", 1)[-1].lower()
    return str(dataset), str(method)


def _settings(config: dict) -> dict:
    leaves = {}
    for subtree in COMPARED_SUBTREES:
        for key, value in _flatten(config.get(subtree) or {}, f"{subtree}.").items():
            if key.rsplit(".", 1)[-1] not in IGNORED_LEAVES:
                leaves[key] = json.dumps(value, sort_keys=True)
    choices = (config.get("hydra") or {}).get("choices") or {}
    if choices.get("model"):
        leaves["model"] = json.dumps(choices["model"])
        leaves.pop("model._target_", None)
    return leaves


def load_run(path: Path) -> Run:
    data = RunRecord.read(path)
    config = data.get("config") or {}
    dataset, method = _names(config)
    metrics = dict(data.get("metrics") or {})
    for key in FEWSHOT_METRICS:  # few-shot runs may keep their accuracy at the top level
        if key not in metrics and isinstance(data.get(key), (int, float)):
            metrics[key] = data[key]
    validation = data.get("validation") or {}
    for key, value in (validation.get("metrics") or {}).items():
        metrics[f"val/{key}"] = value
    status = str(data.get("status", "unknown"))
    if data.get("error") and status != "completed":  # diverged / interrupted: say why
        status = f"{status}: {data['error']}"
    return Run(path=Path(path), status=status, dataset=dataset,
               method=method, seed=config.get("seed"), config=config, metrics=metrics,
               matrix=data.get("accuracy_matrix") or [], settings=_settings(config))


def load_runs(paths) -> list[Run]:
    """Every readable results.json; a damaged one (a job killed while a file system lost its
    last write, a copy cut short) is skipped with a warning, never the whole report."""
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as err:
            reason = " ".join(str(err).split())[:120]
            print(f"warning: skipped {path}: not a readable results.json ({type(err).__name__}: "
                  f"{reason})", file=sys.stderr)
    return runs


def find_results(dirs) -> list[Path]:
    paths = set()
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "results.json":
            paths.add(d.resolve())
            continue
        if not d.exists():
            raise FileNotFoundError(f"{d} does not exist")
        for p in d.rglob("results.json"):
            if "wandb" not in p.relative_to(d).parts:
                paths.add(p.resolve())
    return sorted(paths)


# ------------------------------------------------------------------------------- forgetting ratio
def forgetting_ratio(final, random_final, joint_final) -> list[float]:
    """rho_u = (A_u - A_random,u) / (A_joint,u - A_random,u) - 1 per task (NaN where joint and
    random tie)."""
    out = []
    for a, r, j in zip(final, random_final, joint_final):
        out.append((a - r) / (j - r) - 1 if j != r else float("nan"))
    return out


def _reference_key(run: Run) -> tuple:
    dataset_settings = {k: v for k, v in run.settings.items() if k.startswith("dataset.")}
    return run.dataset, str(run.seed), json.dumps(dataset_settings, sort_keys=True)


def add_forgetting_ratios(runs: list[Run]) -> None:
    """Set `rho` (and `rho_per_task`) on every finished run that has a finished random and joint
    run of the same dataset config and seed among `runs`."""
    refs: dict[tuple, Run] = {}
    for run in runs:
        if run.ok and run.method in (RANDOM_METHOD, JOINT_METHOD) and run.matrix:
            refs[(*_reference_key(run), run.method)] = run
    for run in runs:
        key = _reference_key(run)
        rand, joint = refs.get((*key, RANDOM_METHOD)), refs.get((*key, JOINT_METHOD))
        if not (run.ok and run.matrix and rand and joint):
            continue
        if not len(run.matrix[-1]) == len(rand.matrix[-1]) == len(joint.matrix[-1]):
            continue
        per_task = forgetting_ratio(run.matrix[-1], rand.matrix[-1], joint.matrix[-1])
        finite = [v for v in per_task if math.isfinite(v)]
        if finite:
            run.rho_per_task = per_task
            run.metrics["rho"] = sum(finite) / len(finite)


# ------------------------------------------------------------------------------- grouping
@dataclass
class Cell:
    dataset: str
    method: str
    settings: tuple  # ((key, value), ...) that distinguish this cell from its neighbours
    runs: list
    stats: dict = field(default_factory=dict)  # metric -> (mean %, ci %, n)
    published: dict | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings)

    @property
    def seeds(self) -> list:
        return sorted({str(r.seed) for r in self.runs})


def _pretty(value: str) -> str:
    """A settings value for display: strings bare, floats with 6 significant digits."""
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    if isinstance(decoded, float):
        return f"{decoded:.6g}"
    return decoded if isinstance(decoded, str) else json.dumps(decoded)


def group_runs(runs: list[Run], metrics=METRICS) -> list[Cell]:
    """Finished runs -> cells of (dataset, method, distinguishing settings)."""
    by_pair: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            by_pair.setdefault((run.dataset, run.method), []).append(run)
    cells = []
    for (dataset, method), pair_runs in sorted(by_pair.items()):
        keys = sorted({k for r in pair_runs for k in r.settings})
        varying = [k for k in keys if len({r.settings.get(k) for r in pair_runs}) > 1]
        groups: dict[tuple, list[Run]] = {}
        for run in pair_runs:
            key = tuple((k, _pretty(run.settings.get(k, "null"))) for k in varying)
            groups.setdefault(key, []).append(run)
        for settings, cell_runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            cell = Cell(dataset, method, settings, cell_runs)
            for metric in metrics:
                scale = 1.0 if metric in RATIO_METRICS else 100.0
                values = [scale * r.metrics[metric] for r in cell_runs
                          if isinstance(r.metrics.get(metric), (int, float))]
                if values:
                    cell.stats[metric] = mean_ci(values)
            cells.append(cell)
    return cells


# ------------------------------------------------------------------------------- published
def load_published(path: str | Path | None = None) -> dict:
    if path is None:
        text = resources.files("metacl").joinpath("published.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    return {"sources": data.get("sources") or {}, "results": data.get("results") or []}


def match_published(cell: Cell, published: dict) -> dict | None:
    """The first published row for this cell's dataset, method, passes and task count."""
    run = cell.runs[0]
    epochs = run.n_epochs
    passes = None if epochs is None else ("single" if int(epochs) == 1 else "multi")
    flat = _flatten(run.config)
    for row in published["results"]:
        methods = row.get("method")
        methods = methods if isinstance(methods, list) else [methods]
        if row.get("dataset") != cell.dataset or cell.method not in methods:
            continue
        if row.get("passes") and row["passes"] != passes:
            continue
        if row.get("n_tasks") and row["n_tasks"] != run.n_tasks:
            continue
        where = row.get("where") or {}
        if any(key in flat and flat[key] != value for key, value in where.items()):
            continue
        return row
    return None


# ------------------------------------------------------------------------------- formatting
def _fmt(stat, digits: int = 2) -> str:
    if stat is None:
        return "—"
    mean, ci, _ = stat
    return f"{mean:.{digits}f}" if ci is None else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _columns(cells: list[Cell], metrics) -> list[str]:
    return [m for m in metrics if any(m in c.stats for c in cells)]


def markdown(cells: list[Cell], failed: list[Run], columns, published: dict,
             studies: list[tuple[Path, dict]] = ()) -> str:
    lines = ["# Results", "",
             ("Mean ± 95% CI over runs (Student's t), in percent (rho: a ratio); n = runs "
              "(seeds) averaged. "
              "`published` is the paper's figure for that cell (sources below)."), ""]
    pub_metrics = [m for m in columns if any(c.published and m in c.published for c in cells)]
    header = ["dataset", "method", "settings", "n", *columns,
              *(f"published {m}" for m in pub_metrics)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    used_sources = []
    for cell in cells:
        pub = []
        for m in pub_metrics:
            if cell.published and m in cell.published:
                source = cell.published.get("source", "")
                if source and source not in used_sources:
                    used_sources.append(source)
                pub.append(f"{cell.published[m]:.2f} [{used_sources.index(source) + 1}]"
                           if source else f"{cell.published[m]:.2f}")
            else:
                pub.append("—")
        row = [cell.dataset, cell.method, cell.label or "—", str(len(cell.runs)),
               *(_fmt(cell.stats.get(m), 3 if m in RATIO_METRICS else 2) for m in columns),
               *pub]
        lines.append("| " + " | ".join(row) + " |")
    if not cells:
        lines.append("| " + " | ".join(["—"] * len(header)) + " |")
    if used_sources:
        lines += ["", "Sources:", ""]
        for i, key in enumerate(used_sources, 1):
            text = " ".join(str(published["sources"].get(key, key)).split())
            lines.append(f"{i}. {text}")
    rho_cells = [c for c in cells if any(r.rho_per_task for r in c.runs)]
    if rho_cells:
        lines += ["", "Forgetting ratio per task (`rho`, mean over runs; 0 = joint, -1 = random):",
                  ""]
        for cell in rho_cells:
            rows = [r.rho_per_task for r in cell.runs if r.rho_per_task]
            means = [mean_ci([row[u] for row in rows])[0] for u in range(len(rows[0]))]
            lines.append(f"- {cell.dataset}/{_short(cell)}: "
                         + " ".join(f"{m:+.3f}" for m in means))
    for path, result in studies:
        lines += ["", (f"Optuna study `{path}`: best value {result.get('best_value')} with "
                  f"{result.get('best_params')}")]
    lines += ["", f"## Failed or unfinished jobs ({len(failed)}, not averaged)", ""]
    if failed:
        for run in failed:
            lines.append(f"- `{run.path.parent}`: {run.dataset}/{run.method} seed {run.seed}: "
                         f"{run.status}")
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def write_csv(cells: list[Cell], columns, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["dataset", "method", "settings", "n", "seeds"]
        for m in columns:
            header += [m, f"{m}_ci95"]
        header += [f"published_{m}" for m in columns] + ["published_source"]
        writer.writerow(header)
        for cell in cells:
            row = [cell.dataset, cell.method, cell.label, len(cell.runs), " ".join(cell.seeds)]
            for m in columns:
                mean, ci, _ = cell.stats.get(m, (None, None, 0))
                row += ["" if mean is None else f"{mean:.4f}", "" if ci is None else f"{ci:.4f}"]
            pub = cell.published or {}
            row += [pub.get(m, "") for m in columns] + [pub.get("source", "")]
            writer.writerow(row)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
                "{": r"\{", "}": r"\}", "$": r"\$"}


def _tex(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def latex(cells: list[Cell], columns) -> str:
    lines = [r"\begin{tabular}{lll" + "r" * (len(columns) + 1) + "}", r"\toprule",
             " & ".join(["Dataset", "Method", "Settings", "$n$", *map(_tex, columns)])
             + r" \\", r"\midrule"]
    for cell in cells:
        values = []
        for m in columns:
            stat = cell.stats.get(m)
            if stat is None:
                values.append("--")
            elif stat[1] is None:
                values.append(f"{stat[0]:.2f}")
            else:
                values.append(f"${stat[0]:.2f} \\pm {stat[1]:.2f}$")
        lines.append(" & ".join([_tex(cell.dataset), _tex(cell.method), _tex(cell.label),
                                 str(len(cell.runs)), *values]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- plots
def _short(cell: Cell) -> str:
    return cell.method + (f" ({cell.label})" if cell.label else "")


def plot_final_accuracy(cells: list[Cell], path: Path, metric: str = "RA") -> None:
    """Horizontal bars of the final accuracy per cell with 95% CIs, one panel per dataset;
    the published figure, where known, as a black diamond."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({c.dataset for c in cells if metric in c.stats})
    if not datasets:
        return
    groups = [[c for c in cells if c.dataset == d and metric in c.stats] for d in datasets]
    height = sum(1.2 + 0.55 * len(g) for g in groups) + 0.5
    fig = Figure(figsize=(8.0, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(datasets), 1, squeeze=False,
                        height_ratios=[1 + 0.5 * len(g) for g in groups])[:, 0]
    for ax, dataset, group in zip(axes, datasets, groups):
        y = np.arange(len(group))[::-1]
        means = [c.stats[metric][0] for c in group]
        errs = [c.stats[metric][1] or 0.0 for c in group]
        ax.barh(y, means, xerr=errs, capsize=4, color="tab:blue", alpha=0.8, height=0.6)
        pub = [(y[i], c.published[metric]) for i, c in enumerate(group)
               if c.published and metric in c.published]
        if pub:
            ax.scatter([v for _, v in pub], [i for i, _ in pub], marker="D", color="black",
                       zorder=3, label="published")
            ax.legend(loc="lower right", fontsize=8)
        labels = [textwrap.fill(f"{_short(c)} n={len(c.runs)}", 45) for c in group]
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xlabel(f"{metric} (%)")
        ax.set_xlim(0, 100)
        ax.set_title(f"{dataset}: final {metric}, mean ± 95% CI")
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)


def accuracy_curve(matrix) -> np.ndarray:
    """Mean accuracy over the tasks seen so far after each task: mean(R[t][:t+1])."""
    return np.array([float(np.mean(row[: t + 1])) for t, row in enumerate(matrix)])


def plot_accuracy_over_tasks(cells: list[Cell], path: Path) -> None:
    """Per cell: mean over runs of the accuracy on the tasks seen so far, with a 95% CI band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    datasets = sorted({c.dataset for c in cells})
    if not datasets:
        return
    fig = Figure(figsize=(7.0, 3.8 * len(datasets)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    for ax, dataset in zip(axes, datasets):
        for cell in (c for c in cells if c.dataset == dataset):
            curves = [accuracy_curve(r.matrix) for r in cell.runs if r.matrix]
            length = min((len(c) for c in curves), default=0)
            if length == 0:
                continue
            stack = 100.0 * np.stack([c[:length] for c in curves])
            stats = [mean_ci(stack[:, t]) for t in range(length)]
            mean = np.array([s[0] for s in stats])
            ci = np.array([s[1] or 0.0 for s in stats])
            x = np.arange(1, length + 1)
            (line,) = ax.plot(x, mean, marker="o", markersize=3,
                              label=f"{_short(cell)} (n={len(curves)})")
            ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("tasks trained")
        ax.set_ylabel("accuracy on tasks seen (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{dataset}: accuracy over tasks, mean ± 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------- entry point
@dataclass
class Report:
    cells: list
    failed: list
    columns: list
    markdown: str
    files: dict


def _studies(dirs) -> list[tuple[Path, dict]]:
    found = []
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            for p in sorted(d.rglob("optimization_results.yaml")):
                found.append((p.parent, yaml.safe_load(p.read_text()) or {}))
    return found


def build_report(dirs, out_dir: str | Path | None = None, latex_table: bool = False,
                 plots: bool = True, metrics=None, published_path=None) -> Report:
    runs = load_runs(find_results(dirs))
    add_forgetting_ratios(runs)
    failed = [r for r in runs if not r.ok]
    metrics = list(metrics or (*METRICS, *FEWSHOT_METRICS))
    cells = group_runs(runs, metrics)
    published = load_published(published_path)
    for cell in cells:
        cell.published = match_published(cell, published)
    columns = _columns(cells, metrics)
    text = markdown(cells, failed, columns, published, _studies(dirs))

    out = Path(out_dir) if out_dir else Path(dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    files["markdown"].write_text(text)
    write_csv(cells, columns, files["csv"])
    if latex_table:
        files["latex"] = out / "report.tex"
        files["latex"].write_text(latex(cells, columns))
    if plots and cells:
        if any("RA" in c.stats for c in cells):
            files["bars"] = out / "final_accuracy.png"
            plot_final_accuracy(cells, files["bars"])
        if any(r.matrix for c in cells for r in c.runs):
            files["curves"] = out / "accuracy_over_tasks.png"
            plot_accuracy_over_tasks(cells, files["curves"])
    return Report(cells, failed, columns, text, files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metacl.report",
        description="Aggregate every results.json below the given folders into a table "
                    "(mean ± 95%% CI over seeds) with published numbers, and plots.")
    parser.add_argument("dirs", nargs="+", help="sweep or run output folders (searched "
                                                "recursively for results.json)")
    parser.add_argument("--out", help="where to write report.md/.csv/.tex and the plots "
                                      "(default: <first dir>/report)")
    parser.add_argument("--latex", action="store_true", help="also write report.tex")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--metrics", help="comma-separated columns (default: RA,BTI,ACC,BWT,"
                                          "FWT,forgetting and test_acc where present; "
                                          "val/RA etc. also work)")
    parser.add_argument("--published", help="another published-numbers YAML "
                                            "(default: metacl/published.yaml)")
    args = parser.parse_args(argv)
    missing = [d for d in args.dirs if not Path(d).exists()]
    if missing:  # before anything is written (no <missing>/report/ folder)
        print(f"error: {missing[0]} does not exist; allowed: run or sweep folders that hold "
              "results.json files (outputs/<task_name>/...)", file=sys.stderr)
        return 2
    try:
        report = build_report(args.dirs, args.out, latex_table=args.latex,
                              plots=not args.no_plots,
                              metrics=args.metrics.split(",") if args.metrics else None,
                              published_path=args.published)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    written = ", ".join(str(p) for p in report.files.values())
    print(f"{len(report.cells)} cells, {len(report.failed)} failed or unfinished jobs; "
          f"wrote {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
