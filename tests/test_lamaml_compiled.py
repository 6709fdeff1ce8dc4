"""method.compile=true (metacl.methods.lamaml_compiled): the compiled glance + outer step equals
the method's eager paths on the CPU, over several incoming batches with a task switch, a full
memory and the shorter shapes that run uncompiled.

Inductor (the backend a user run gets) compiles one configuration; the variants use the
"aot_eager" backend, which traces the same whole-glance program (fullgraph, functionalised)
without generating C++ (seconds instead of a minute on a 2-core CPU).
"""

from __future__ import annotations

import pytest
import torch

from metacl.errors import ConfigError
from metacl.methods.la_er import LaER
from metacl.methods.lamaml import LaMAML
from metacl.models import MLP, PcCNN
from metacl.task_info import TaskInfo

SHAPE = (1, 4, 4)


def class_info() -> TaskInfo:
    return TaskInfo(2, SHAPE, 4, ((0, 1), (2, 3)), "class")


def stream(dtype, batch=4):
    """Task 0: 3 full batches; task 1: 2 full batches and a shorter last one (3 samples)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for t, sizes in ((0, (batch,) * 3), (1, (batch, batch, batch - 1))):
        for n in sizes:
            x = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
            out.append((t, x, torch.randint(2 * t, 2 * t + 2, (n,), generator=g)))
    return out


def run(dtype, backbone="mlp", backend=None, device="cpu", cls=LaMAML, **options):
    torch.manual_seed(0)
    net = MLP(SHAPE, 4, hidden=(6,)) if backbone == "mlp" else PcCNN(SHAPE, 4, channels=3)
    m = cls(net.to(dtype), class_info(), batch_size=4, glances=2, memories=5,
               replay_batch_size=3, **options).to(device=device, dtype=dtype)
    if backend is not None:
        m._compiled.backend = backend
    torch.manual_seed(7)  # shuffles, replay draws, reservoir slots: one stream for every path
    task = -1
    for t, x, y in stream(dtype):
        if t != task:
            m.before_task(t, None)
            task = t
        x, y = x.to(device), y.to(device)
        loss = m.observe(x, y, torch.full((x.shape[0],), t, device=device))
    state = [p.detach().clone() for p in [*m.backbone.parameters(), *m.alpha]]
    return m, state, loss, m.memory.x.clone().cpu()


def max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a, b))


SECOND_ORDER = {"inner_batches": 2, "second_order": True, "inner_grad_clamp": 0.5,
                "inner_lr_relu": False, "grad_clip_norm": 1.0}


def test_inductor_program_equals_the_literal_loop_in_float64():
    """The CIFAR setting's structure (chunks, second order, clamp, clip, class masks)."""
    _, want, want_loss, want_memory = run(torch.float64, vectorize=False, **SECOND_ORDER)
    m, got, loss, memory = run(torch.float64, compile=True, vectorize=False, **SECOND_ORDER)
    assert m._compiled.compiled_calls > 0 and m._compiled.eager_calls > 0  # both shapes ran
    assert max_diff(want, got) < 1e-10
    assert abs(float(want_loss) - float(loss)) < 1e-10
    assert torch.equal(want_memory, memory)  # the same replay draws and reservoir slots
    # and the weights did move (a program that changed nothing would not match a no-op)
    torch.manual_seed(0)
    initial = list(MLP(SHAPE, 4, hidden=(6,)).to(torch.float64).parameters())
    assert max_diff(want[:len(initial)], initial) > 1e-3


VARIANTS = {
    "lamaml first order (default fast path)": {},
    "lamaml first order, one stacked forward": {"inner_batches": 2},
    "sync_lamaml": {"sync_update": True, "opt_wt": 0.2},
    "cmaml": {"learn_lr": False, "sync_update": True},
    "second order, literal loop": {**SECOND_ORDER, "vectorize": False},
    "second order, stacked meta-losses": {**SECOND_ORDER, "vectorize": True},
}


LA_ER = {"cls": LaER}


@pytest.mark.parametrize("variant", [*VARIANTS, "la_er", "la_er second order"])
def test_compiled_program_equals_todays_path_in_float32(variant):
    """Against the path the method takes without compile (the hand-written MLP glance, the
    flat first-order fast path or the autograd loop): 1e-6 after six batches in float32.
    La-ER: alpha from the look-ahead loss at the last fast weights, w from the replay loss."""
    options = {"la_er": LA_ER, "la_er second order": {**LA_ER, "second_order": True}}.get(
        variant) or VARIANTS[variant]
    _, want, want_loss, _ = run(torch.float32, **options)
    m, got, loss, _ = run(torch.float32, backend="aot_eager", compile=True, **options)
    assert m._compiled.compiled_calls > 0 and m._compiled.eager_calls > 0
    assert max_diff(want, got) < 1e-6
    assert abs(float(want_loss) - float(loss)) < 1e-6


def test_compiled_program_on_a_conv_backbone():
    _, want, _, _ = run(torch.float64, backbone="cnn", vectorize=False, **SECOND_ORDER)
    _, got, _, _ = run(torch.float64, backbone="cnn", backend="aot_eager", compile=True,
                       vectorize=False, **SECOND_ORDER)
    assert max_diff(want, got) < 1e-10


def test_compile_is_refused_where_the_update_is_not_la_mamls():
    class OwnUpdate(LaMAML):
        def observe(self, x, y, t):
            return super().observe(x, y, t)

    class OwnLoss(LaMAML):
        def loss(self, logits, y, t):
            return super().loss(logits, y, t)

    class OwnUpdateAndGlance(OwnUpdate):
        def functional_glance(self, *args):
            return super().functional_glance(*args)

    with pytest.raises(ConfigError, match="OwnUpdate has its own update but no functional_gl"):
        OwnUpdate(MLP(SHAPE, 4), class_info(), compile=True)
    with pytest.raises(ConfigError, match="method.compile=true: OwnLoss changes the loss"):
        OwnLoss(MLP(SHAPE, 4), class_info(), compile=True)
    assert OwnUpdateAndGlance(MLP(SHAPE, 4), class_info(), compile=True)._compiled is not None
    assert LaER(MLP(SHAPE, 4), class_info(), compile=True)._compiled is not None
    m = LaMAML(MLP(SHAPE, 4), class_info(), compile=True)
    assert "compile" in m.population_blocker()
    assert LaMAML(MLP(SHAPE, 4), class_info()).population_blocker() is None


def test_more_compiled_runs_in_one_process_than_dynamos_recompile_limit():
    """A multirun's jobs run one after another in one process: each job's method compiles its
    own program (a sweep over opt_lr: 9 different constants in the same code object; Dynamo
    keeps 8 entries per code object, and a fullgraph compile past them fails)."""
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 0, 1])
    kept = []  # earlier jobs' methods may stay referenced (results, loggers, the test here)
    for seed in range(9):
        torch.manual_seed(seed)
        m = LaMAML(MLP(SHAPE, 4, hidden=(3,)), class_info(), batch_size=4, glances=1,
                   memories=4, replay_batch_size=2, opt_lr=0.1 + 0.01 * seed, compile=True)
        m._compiled.backend = "eager"  # Dynamo alone: its cache and limit, no codegen
        m.before_task(0, None)
        for _ in range(2):  # the second batch has the steady shapes: the compiled program
            m.observe(x, y, torch.zeros(4, dtype=torch.long))
        assert m._compiled.compiled_calls == 1
        kept.append(m)
