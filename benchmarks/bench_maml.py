"""Speed of one MAML meta-batch with Omniglot shapes, as `make bench` prints it.

    python benchmarks/bench_maml.py                  # per-task loop and vmap, first order
    python benchmarks/bench_maml.py --second-order   # the same, second order
    python benchmarks/bench_maml.py --threads 1      # torch intra-op threads (default: torch's)
    python benchmarks/bench_maml.py --cpu-allocator system    # glibc untouched

The setting of the issue: Conv4 with 64 filters on 28x28 inputs, 5-way 1-shot, 15 queries per
class, 5 inner steps, meta-batch of 32 tasks, random inputs. Timed: one whole meta-update
(inner loops, query losses, backward, Adam step), the median of ``--repeats`` after
``--warmup`` untimed ones. Printed per implementation:

* ``loop``: our MAML, tasks one by one (``vectorize=loop``, what ``auto`` picks on the CPU);
* ``vmap``: our MAML, the tasks of the meta-batch vmapped (what ``auto`` picks on a GPU);
* ``port``: a re-implementation of the structure of the MAML-Pytorch port (dragen1860) for
  comparison on the same machine and at the same time: tasks in a Python loop, inner
  gradients by ``torch.autograd.grad`` without ``create_graph`` (first order, as written), the
  query loss recomputed after every inner step with graph, one backward at the end.

The process takes the C library's malloc settings a run takes (``cpu_allocator: tuned``,
metacl.allocator) unless ``--cpu-allocator system``; they apply to all three rows.

On a shared machine absolute times move with the load; compare the rows of one invocation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from metacl.allocator import ALLOCATOR_SETTINGS, set_cpu_allocator
from metacl.data.episodic import EpisodeInfo, Episodes
from metacl.fewshot.maml import MAML
from metacl.models.conv4 import Conv4


def episodes(tasks: int, ways: int, shots: int, query: int, device) -> Episodes:
    gen = torch.Generator(device=device).manual_seed(0)

    def images(n):
        return torch.rand(tasks, n, 1, 28, 28, generator=gen, device=device)

    def labels(k):
        return torch.arange(ways, device=device).repeat_interleave(k).expand(tasks, -1)

    return Episodes(images(ways * shots), labels(shots), images(ways * query), labels(query),
                    torch.zeros(tasks, ways, dtype=torch.long, device=device))


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ours(vectorize: str, args, batch: Episodes, device):
    info = EpisodeInfo("classification", (1, 28, 28), args.ways, args.ways, args.shots,
                       args.query, args.ways, args.shots, args.query, 0)
    torch.manual_seed(0)
    method = MAML(Conv4((1, 28, 28), args.ways, channels=64), info, inner_lr=0.4,
                  inner_steps=args.steps, first_order=not args.second_order,
                  meta_batch_size=args.tasks, vectorize=vectorize).to(device)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        method.meta_step(batch)
        optimizer.step()

    return step


def port(args, batch: Episodes, device):
    """The port's structure (see the module docstring), on the same Conv4."""
    torch.manual_seed(0)
    net = Conv4((1, 28, 28), args.ways, channels=64).to(device)
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step():
        total = 0.0
        for i in range(batch.n_tasks):
            sx, sy = batch.support_x[i], batch.support_y[i]
            qx, qy = batch.query_x[i], batch.query_y[i]
            g = torch.autograd.grad(F.cross_entropy(net(sx, params), sy), params)
            fast = [p - 0.4 * gi for p, gi in zip(params, g)]
            loss_q = F.cross_entropy(net(qx, fast), qy)
            for _ in range(1, args.steps):
                g = torch.autograd.grad(F.cross_entropy(net(sx, fast), sy), fast)
                fast = [p - 0.4 * gi for p, gi in zip(fast, g)]
                loss_q = F.cross_entropy(net(qx, fast), qy)
            total = total + loss_q
        optimizer.zero_grad(set_to_none=True)
        (total / batch.n_tasks).backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--second-order", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-allocator", choices=ALLOCATOR_SETTINGS, default="tuned")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["loop", "vmap", "port"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_cpu_allocator(args.cpu_allocator)
    device = torch.device(args.device)
    batch = episodes(args.tasks, args.ways, args.shots, args.query, device)
    builders = {"loop": lambda: ours("loop", args, batch, device),
                "vmap": lambda: ours("vmap", args, batch, device),
                "port": lambda: port(args, batch, device)}
    seconds = {name: round(_time(builders[name](), device, args.warmup, args.repeats), 4)
               for name in args.only if not (name == "port" and args.second_order)}
    report = {
        "setting": f"conv4-64 {args.ways}-way {args.shots}-shot, {args.query} query, "
                   f"{args.steps} inner steps, meta-batch {args.tasks}, "
                   f"{'second' if args.second_order else 'first'} order",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_allocator": args.cpu_allocator,
        "seconds_per_meta_batch": seconds,
    }
    if "loop" in seconds and "vmap" in seconds:
        report["vmap_speedup_over_loop"] = round(seconds["loop"] / seconds["vmap"], 2)
    if "loop" in seconds and "port" in seconds:
        report["port_over_loop"] = round(seconds["port"] / seconds["loop"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
