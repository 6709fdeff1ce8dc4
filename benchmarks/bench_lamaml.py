"""Speed of La-MAML's `observe` on synthetic data, against a naive per-step implementation.

    python benchmarks/bench_lamaml.py                  # MNIST-shaped, rotations hyperparameters
    python benchmarks/bench_lamaml.py --naive          # ... and the naive loop on the same stream
    python benchmarks/bench_lamaml.py --cifar          # CIFAR-100-shaped, pc_cnn, second order
    python benchmarks/bench_lamaml.py --cifar --device cuda   # ... on a GPU

MNIST mode streams 20 tasks x 100 incoming batches of 10 (the default run: 2000 observe calls,
5 glances each, 10 single-sample inner steps and 10 meta-losses on 20 samples per glance) with
the hyperparameters of conf/method/lamaml.yaml, and prints seconds and batches/s.

CIFAR mode times a few incoming batches on 3x32x32 inputs with the CIFAR-100 single-pass
La-MAML settings (pc_cnn, batch 10, glances 10, 5 inner chunks, second order, clip 1.0),
after a warm-up with a full memory, and prints the per-batch cost of the method and of the
naive loop.

The naive implementation below is the algorithm written the obvious way (as the reference
does it): fast weights through autograd, one forward/backward of the meta-batch per inner
step, optimizers stepped per glance. It checks nothing; tests/test_lamaml.py checks the maths.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metacl.memory import ReservoirBuffer
from metacl.methods.base import MASK_VALUE
from metacl.models import MLP, PcCNN
from metacl.task_info import TaskInfo

CONF = Path(__file__).resolve().parents[1] / "conf"


# ------------------------------------------------------------------------------ naive version
class NaiveLaMAML:
    """La-MAML glance by glance, with a graph through the fast weights (reference structure)."""

    def __init__(self, net, info: TaskInfo, hp: dict):
        self.net, self.hp, self.info = net, hp, info
        device = next(net.parameters()).device
        self.alpha = [torch.full_like(p, hp["alpha_init"]).requires_grad_(hp["learn_lr"])
                      for p in net.parameters()]
        self.memory = ReservoirBuffer(hp["memories"], info.input_shape).to(device)
        self.mask = info.class_mask().to(device)
        self.task = 0

    def loss(self, logits, y, t):
        if self.info.multi_head:
            logits = logits.masked_fill(~self.mask[t], MASK_VALUE)
        return F.cross_entropy(logits, y)

    def observe(self, x, y, t):
        hp, net = self.hp, self.net
        weights = list(net.parameters())
        for glance in range(hp["glances"]):
            perm = torch.randperm(x.shape[0], device=x.device)
            x, y, t = x[perm], y[perm], t[perm]
            bx, by, bt = x, y, t
            if len(self.memory):
                mx, my, mt = self.memory.sample(hp["replay_batch_size"])
                bx, by, bt = torch.cat([mx, x]), torch.cat([my, y]), torch.cat([mt, t])
            size = 1 if hp["inner_batches"] is None else math.ceil(
                x.shape[0] / hp["inner_batches"])
            fast, metas = weights, []
            for i in range(0, x.shape[0], size):
                inner = self.loss(net(x[i : i + size], fast), y[i : i + size], self.task)
                grads = torch.autograd.grad(inner, fast, create_graph=hp["second_order"])
                if hp["inner_grad_clamp"] is not None:
                    c = hp["inner_grad_clamp"]
                    grads = [g.clamp(-c, c) for g in grads]
                steps = [a.relu() if hp["inner_lr_relu"] else a for a in self.alpha]
                fast = [f - s * g for f, s, g in zip(fast, steps, grads)]
                metas.append(self.loss(net(bx, fast), by, bt))
            meta = sum(metas) / len(metas)
            for p in weights + self.alpha:
                p.grad = None
            meta.backward()
            torch.nn.utils.clip_grad_norm_(weights, hp["grad_clip_norm"])
            with torch.no_grad():
                if hp["learn_lr"]:
                    torch.nn.utils.clip_grad_norm_(self.alpha, hp["grad_clip_norm"])
                    for a in self.alpha:
                        a -= hp["opt_lr"] * a.grad
                for p, a in zip(weights, self.alpha):
                    p -= (hp["opt_wt"] if hp["sync_update"] else a.relu()) * p.grad
            if glance == 0:
                self.memory.add(x, y, t)
        return meta.detach()


# ------------------------------------------------------------------------------ streams
def mnist_stream(n_tasks: int, n_batches: int, batch: int):
    """Per task, 10 random 28x28 prototypes; samples are noisy prototypes in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    for task in range(n_tasks):
        protos = torch.rand(10, 1, 28, 28, generator=g)
        for _ in range(n_batches):
            y = torch.randint(0, 10, (batch,), generator=g)
            x = (0.7 * protos[y] + 0.3 * torch.rand(batch, 1, 28, 28, generator=g))
            yield task, x, y, torch.full((batch,), task)


def method_hparams(name: str, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "method" / f"{name}.yaml"))
    cfg.update(overrides)
    return cfg


def run_stream(method, stream, before_task) -> tuple[float, int]:
    task, n = -1, 0
    started = time.perf_counter()
    for t, x, y, tt in stream:
        if t != task:
            task = t
            before_task(t)
        loss = method.observe(x, y, tt)
        n += 1
    float(loss)
    return time.perf_counter() - started, n


def bench_mnist(args) -> None:
    n_tasks, n_batches = 20, args.batches // 20
    info = TaskInfo(n_tasks, (1, 28, 28), 10, ((*range(10),),) * n_tasks, "domain")
    hp = method_hparams("lamaml")
    torch.manual_seed(0)
    method = instantiate(hp, _partial_=True)(backbone=MLP((1, 28, 28), 10), task_info=info)
    seconds, n = run_stream(method, mnist_stream(n_tasks, n_batches, hp["batch_size"]),
                            lambda t: method.before_task(t, None))
    glances = n * hp["glances"]
    print(f"La-MAML (metacl, vectorize={hp['vectorize']}): {n} batches in {seconds:.2f} s = "
          f"{n / seconds:.1f} batches/s ({1e3 * seconds / glances:.3f} ms per glance)")
    if args.naive:
        torch.manual_seed(0)
        naive = NaiveLaMAML(MLP((1, 28, 28), 10), info, hp)
        seconds, n = run_stream(naive, mnist_stream(n_tasks, n_batches, hp["batch_size"]),
                                lambda t: setattr(naive, "task", t))
        print(f"naive per-step loop:        {n} batches in {seconds:.2f} s = "
              f"{n / seconds:.1f} batches/s ({1e3 * seconds / glances:.3f} ms per glance)")


def bench_cifar(args) -> None:
    n_tasks, shape = 20, (3, 32, 32)
    classes = tuple(tuple(range(5 * u, 5 * u + 5)) for u in range(n_tasks))
    info = TaskInfo(n_tasks, shape, 100, classes, "class")
    hp = method_hparams("lamaml", glances=10, alpha_init=0.1, opt_lr=0.25, opt_wt=0.1,
                        inner_batches=5, second_order=True, grad_clip_norm=1.0,
                        inner_grad_clamp=1.0, inner_lr_relu=False, vectorize=False)
    g = torch.Generator().manual_seed(0)
    device = torch.device(args.device)

    def batch(task):
        y = torch.tensor(classes[task])[torch.randint(0, 5, (10,), generator=g)]
        x, t = torch.randn(10, *shape, generator=g), torch.full((10,), task)
        return x.to(device), y.to(device), t.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    for name in ("metacl", "naive"):
        if name == "naive" and not args.naive_cifar:
            continue
        torch.manual_seed(0)
        if name == "metacl":
            method = instantiate(hp, _partial_=True)(backbone=PcCNN(shape, 100), task_info=info)
            method.to(device)
            method.before_task(1, None)
            method.memory.add(*batch(0))
        else:
            method = NaiveLaMAML(PcCNN(shape, 100).to(device), info, hp)
            method.task = 1
            method.memory.add(*batch(0))
        method.observe(*batch(1))  # warm-up (allocations, memory non-empty)
        sync()
        started = time.perf_counter()
        for _ in range(args.cifar_batches):
            float(method.observe(*batch(1)))
        sync()
        results[name] = (time.perf_counter() - started) / args.cifar_batches
        print(f"CIFAR-100 La-MAML on {device}, {name:7s}: {results[name]:.3f} s per incoming batch "
              f"({1e3 * results[name] / hp['glances']:.1f} ms per glance)")
    if len(results) == 2:
        print(f"speed-up: {results['naive'] / results['metacl']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--batches", type=int, default=2000, help="MNIST incoming batches")
    parser.add_argument("--naive", action="store_true", help="also time the naive loop (MNIST)")
    parser.add_argument("--cifar", action="store_true", help="CIFAR-100-shaped per-batch cost")
    parser.add_argument("--cifar-batches", type=int, default=3, help="timed CIFAR batches")
    parser.add_argument("--no-naive-cifar", dest="naive_cifar", action="store_false",
                        help="skip the naive loop in --cifar mode")
    parser.add_argument("--device", default="cpu", help="--cifar mode: cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.cifar:
        bench_cifar(args)
    else:
        bench_mnist(args)


if __name__ == "__main__":
    main()
