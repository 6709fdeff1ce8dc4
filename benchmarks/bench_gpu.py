"""GPU speed of the La-MAML family and the baselines at paper scale, every row side by side.

    python benchmarks/bench_gpu.py                      # on cuda:0, all rows
    python benchmarks/bench_gpu.py --device cpu --quick # a CPU smoke run (small counts)
    python benchmarks/bench_gpu.py --rows lamaml_cifar,default_run
    python benchmarks/bench_gpu.py --json out.json      # the rows as JSON too

Two kinds of rows (each prints its peak GPU memory on CUDA):

* per incoming batch (`observe` on synthetic batches of the experiment's shapes, methods and
  models built from the experiment's own config, after warm-up batches with a full memory,
  which include the compilation): ours eager (`method.compile=false`), ours compiled
  (`method.compile=true`: the glance + outer step as one torch.compile program, a CUDA graph
  on a GPU; MER: each single-sample step; Meta-BGD: each Monte-Carlo sample's gradients),
  and the naive eager loop of benchmarks/bench_lamaml.py (the reference's
  structure: fast weights through autograd, one backward per glance);
* whole runs (`train.py` configs run in-process on CIFAR-100 lookalike files in the real
  pickle format, written to a temporary folder): train seconds per incoming batch of ER,
  finetune and iCaRL on two tasks; the default experiment's train seconds (eager and compiled);
  with --e2e, the CIFAR-100 single-pass La-MAML experiment end to end on full-size files
  (50,000 training images), evaluation included.

The reference La-MAML code is timed by benchmarks/bench_reference_lamaml.py (its MNIST
setting); issue #20 lists its CIFAR figure (0.761 s per batch on an H200).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from bench_lamaml import NaiveLaMAML
from fixtures import write_cifar

from metacl.task_info import TaskInfo

CONF = ROOT / "conf"
CIFAR = ((3, 32, 32), 100, 20)  # input shape, classes, tasks (5 classes each)
TINY = ((3, 64, 64), 200, 40)

# name: (experiment, shapes)
OBSERVE_ROWS = {
    "lamaml_cifar": ("lamaml/lamaml_cifar100_single_pass", CIFAR),
    "cmaml_cifar": ("lamaml/cmaml_cifar100_single_pass", CIFAR),
    "sync_lamaml_cifar": ("lamaml/sync_lamaml_cifar100_single_pass", CIFAR),
    "la_er_cifar": ("lamaml/la_er_cifar100_single_pass", CIFAR),
    "lamaml_tinyimagenet": ("lamaml/lamaml_tinyimagenet_single_pass", TINY),
    # MER's eager path on a conv net is the naive loop itself (one optimizer step per sample)
    "mer_cifar": ("baselines/mer_cifar100_single_pass", CIFAR),
    # Meta-BGD's eager path is La-MAML's literal autograd loop, i.e. the naive loop
    "meta_bgd_cifar": ("baselines/meta_bgd_cifar100_single_pass", CIFAR),
}
RUN_ROWS = ("er_cifar", "finetune_cifar", "icarl_cifar", "default_run")


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


# ------------------------------------------------------------------------------ observe rows
def observe_row(name: str, args, device: torch.device) -> dict:
    experiment, (shape, n_classes, n_tasks) = OBSERVE_ROWS[name]
    cfg = compose_cfg([f"experiment={experiment}"])
    classes = tuple(tuple(range(5 * u, 5 * u + 5)) for u in range(n_tasks))
    info = TaskInfo(n_tasks, shape, n_classes, classes, "class")
    batch = int(cfg.method.batch_size)
    g = torch.Generator().manual_seed(0)

    def incoming(task: int):
        y = torch.tensor(classes[task])[torch.randint(0, 5, (batch,), generator=g)]
        x, t = torch.randn(batch, *shape, generator=g), torch.full((batch,), task)
        return x.to(device), y.to(device), t.to(device)

    # MER: 2,600 single-sample steps per incoming batch (seconds each, eager): fewer batches
    n_batches, n_warmup = ((max(1, args.batches // 10), min(args.warmup, 1))
                           if name.startswith("mer") else (args.batches, args.warmup))
    variants = {"eager": {"compile": False}, "compiled": {"compile": True}, "naive": None}
    if "compile" not in cfg.method:  # La-ER: no compiled program
        variants.pop("compiled")
    if not name.startswith(("lamaml", "cmaml", "sync_lamaml")):
        variants.pop("naive")  # the naive loop is La-MAML's box
    row = {"row": name, "experiment": experiment, "device": str(device)}
    for variant, extra in variants.items():
        torch.manual_seed(0)
        backbone = instantiate(cfg.model, input_shape=shape, n_outputs=n_classes)
        if extra is None:
            hp = {k: cfg.method[k] for k in cfg.method if k != "_target_"}
            method = NaiveLaMAML(backbone.to(device), info, hp)
            method.task = 1
        else:
            method = instantiate(cfg.method, _partial_=True, **extra)(backbone=backbone,
                                                                      task_info=info)
            method.to(device)
            method.before_task(1, None)
            if getattr(method, "optimizer", None) is not None:  # SGD steps outside a Trainer
                method.optimizers = lambda m=method: m.optimizer
                method.manual_backward = lambda loss: loss.backward()
        for _ in range(-(-int(cfg.method.memories) // batch)):  # a full memory of task 0
            method.memory.add(*incoming(0))
        reset_peak(device)
        started = time.perf_counter()
        for _ in range(n_warmup):  # allocations, autotuning, compilation, graph capture
            method.observe(*incoming(1))
        sync(device)
        warmup = time.perf_counter() - started
        data = [incoming(1) for _ in range(n_batches)]
        sync(device)
        started = time.perf_counter()
        for x, y, t in data:
            loss = method.observe(x, y, t)
        float(loss)
        sync(device)
        seconds = (time.perf_counter() - started) / n_batches
        row[variant] = {"s_per_batch": round(seconds, 4), "warmup_s": round(warmup, 1),
                        "peak_mib": peak_mib(device)}
        print(f"{name:22s} {variant:9s} {seconds:8.4f} s per incoming batch "
              f"(warm-up {warmup:.1f} s, peak {peak_mib(device)} MiB)", flush=True)
    if "naive" in row:
        for variant in ("eager", "compiled"):
            if variant in row:
                row[variant]["vs_naive"] = round(
                    row["naive"]["s_per_batch"] / row[variant]["s_per_batch"], 2)
    if "compiled" in row:
        row["compiled"]["vs_eager"] = round(
            row["eager"]["s_per_batch"] / row["compiled"]["s_per_batch"], 2)
    return row


# ------------------------------------------------------------------------------ run rows
def run_cfg(overrides: list[str], out: Path) -> dict:
    from metacl.runner.main import main as run_main

    cfg = compose_cfg(["logger=none", "save_checkpoints=false", f"paths.output_dir={out}",
                       *overrides])
    run_main(cfg)
    return json.loads((out / "results.json").read_text())


def run_row(name: str, args, device: torch.device, data: Path, scratch: Path) -> dict:
    trainer = "trainer=gpu" if device.type == "cuda" else "trainer=cpu"
    if name == "default_run":
        variants = {"eager": [], "compiled": ["method.compile=true"]}
        common = [trainer]
        if args.quick:
            common += ["dataset.limit_tasks=2"]
    else:
        method = name.removesuffix("_cifar")
        experiment = {"er": "baselines/er_cifar100_single_pass",
                      "icarl": "baselines/icarl_cifar100_single_pass",
                      "finetune": None}[method]
        common = [trainer, f"data_dir={data}", "dataset.source.verify_md5=false",
                  "dataset.limit_tasks=2"]
        common += [f"experiment={experiment}"] if experiment else [
            "dataset=cifar100", "model=pc_cnn", "method=finetune"]
        variants = {"ours": []}
    row = {"row": name, "device": str(device)}
    for variant, extra in variants.items():
        reset_peak(device)
        out = scratch / f"{name}-{variant}"
        results = run_cfg([*common, *extra], out)
        train = results["timing"]["train_seconds"]
        entry = {"train_s": round(train, 2), "RA": round(results["metrics"]["RA"], 4),
                 "peak_mib": peak_mib(device)}
        steps = results.get("timing", {}).get("train_batches")
        if steps:
            entry["s_per_batch"] = round(train / steps, 4)
        row[variant] = entry
        print(f"{name:22s} {variant:9s} train {train:7.2f} s "
              + (f"({entry['s_per_batch']:.4f} s per batch) " if steps else "")
              + f"RA {entry['RA']:.4f} peak {entry['peak_mib']} MiB", flush=True)
    return row


def e2e_row(args, device: torch.device, data: Path, scratch: Path) -> dict:
    trainer = "trainer=gpu" if device.type == "cuda" else "trainer=cpu"
    row = {"row": "lamaml_cifar_e2e", "device": str(device)}
    reset_peak(device)
    started = time.perf_counter()
    results = run_cfg([trainer, "experiment=lamaml/lamaml_cifar100_single_pass",
                       "method.compile=true", f"data_dir={data}",
                       "dataset.source.verify_md5=false"], scratch / "e2e")
    row["compiled"] = {"wall_s": round(time.perf_counter() - started, 1),
                       "train_s": round(results["timing"]["train_seconds"], 1),
                       "total_s": round(results["timing"]["total_seconds"], 1),
                       "RA": round(results["metrics"]["RA"], 4), "peak_mib": peak_mib(device)}
    print(f"lamaml_cifar_e2e       compiled  {row['compiled']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default=",".join([*OBSERVE_ROWS, *RUN_ROWS]),
                        help=f"comma-separated, from: {', '.join([*OBSERVE_ROWS, *RUN_ROWS])}")
    parser.add_argument("--batches", type=int, default=20, help="timed incoming batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--quick", action="store_true",
                        help="small counts (a smoke run: --batches 2 --warmup 1, 2 tasks)")
    parser.add_argument("--e2e", action="store_true",
                        help="also the full-size CIFAR-100 single-pass run end to end")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON (after each)")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.warmup = 2, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible; allowed: --device cpu")
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in OBSERVE_ROWS and r not in RUN_ROWS]
    if unknown:
        sys.exit(f"error: --rows {','.join(unknown)}: allowed: "
                 f"{', '.join([*OBSERVE_ROWS, *RUN_ROWS])}")
    print(f"torch {torch.__version__} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = None
        if any(r in RUN_ROWS for r in rows) or args.e2e:
            per_class = 20 if args.quick else 500
            data = write_cifar(scratch / "data", 100, train_per_class=per_class,
                               test_per_class=max(2, per_class // 5))
        for name in rows:
            if name in OBSERVE_ROWS:
                results.append(observe_row(name, args, device))
            else:
                results.append(run_row(name, args, device, data, scratch))
            if args.json:  # after every row: a run stopped by a time limit keeps its rows
                args.json.write_text(json.dumps(results, indent=2))
        if args.e2e:
            results.append(e2e_row(args, device, data, scratch))
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
