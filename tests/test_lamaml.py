"""La-MAML / C-MAML / Sync-La-MAML / La-ER: update rules checked against hand-written autograd.

The expected updates below are written from the paper's algorithm with plain autograd on an
explicit two-layer network (`two_layer`), independently of the method's code paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metacl.methods.la_er import LaER
from metacl.methods.lamaml import LaMAML
from metacl.models import MLP, PcCNN
from metacl.task_info import TaskInfo

SHAPE = (1, 2, 3)  # 6 input features
N_OUT = 4


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only spin on a shared CPU
    yield
    torch.set_num_threads(previous)


def domain_info(n_tasks: int = 3) -> TaskInfo:
    return TaskInfo(n_tasks, SHAPE, N_OUT, ((0, 1, 2, 3),) * n_tasks, "domain")


def class_info() -> TaskInfo:
    return TaskInfo(2, SHAPE, N_OUT, ((0, 1), (2, 3)), "class")


def make(cls=LaMAML, info=None, **kwargs) -> LaMAML:
    torch.manual_seed(0)
    net = MLP(SHAPE, N_OUT, hidden=(5,))  # two layers: W1 (5x6), b1, W2 (4x5), b2
    return cls(net, info or domain_info(), **kwargs)


def two_layer(x, p):
    w1, b1, w2, b2 = p
    return F.relu(x.reshape(x.shape[0], -1) @ w1.T + b1) @ w2.T + b2


def clipped(grads, max_norm):
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * coef for g in grads]


def expected_lamaml(w, alpha, x, y, bx, by, *, opt_lr, opt_wt, learn_lr, sync, clip,
                    second_order=False):
    """One La-MAML glance, literally: single-sample inner steps, meta-loss after each, mean."""
    w = [p.detach().clone().requires_grad_() for p in w]
    alpha = [a.detach().clone().requires_grad_() for a in alpha]
    fast, metas = w, []
    for i in range(x.shape[0]):
        inner = F.cross_entropy(two_layer(x[i : i + 1], fast), y[i : i + 1])
        g = torch.autograd.grad(inner, fast, create_graph=second_order)
        fast = [f - a.relu() * gi for f, a, gi in zip(fast, alpha, g)]
        metas.append(F.cross_entropy(two_layer(bx, fast), by))
    meta = sum(metas) / len(metas)
    grads = torch.autograd.grad(meta, w + alpha)
    gw, ga = clipped(grads[:4], clip), clipped(grads[4:], clip)
    with torch.no_grad():
        new_alpha = [a - opt_lr * g for a, g in zip(alpha, ga)] if learn_lr else alpha
        if sync:
            new_w = [p - opt_wt * g for p, g in zip(w, gw)]
        else:
            new_w = [p - a.relu() * g for p, a, g in zip(w, new_alpha, gw)]
    return [p.detach() for p in new_w], [a.detach() for a in new_alpha]


def path_gradients(m, vectorize, *args, every=True):
    """Meta-gradients of one glance through the fast (vectorize) or the literal autograd path."""
    m.vectorize = vectorize
    return m.meta_gradients(*args, meta_every_step=every)


def replay_rng(seed, batch, memory_size, replay):
    """The draws observe makes for one glance: the shuffle, then the memory sample."""
    torch.manual_seed(seed)
    perm = torch.randperm(batch)
    idx = torch.randperm(memory_size)[:replay] if memory_size else None
    return perm, idx


def batch(n, task=0, classes=(0, 1, 2, 3)):
    x = torch.randn(n, *SHAPE)
    y = torch.tensor(classes)[torch.randint(len(classes), (n,))]
    return x, y, torch.full((n,), task)


# ----------------------------------------------------------------------- (1)-(3) update rules
VARIANTS = {
    "lamaml": {"learn_lr": True, "sync_update": False, "opt_lr": 0.3, "opt_wt": 0.1},
    "sync": {"learn_lr": True, "sync_update": True, "opt_lr": 0.1, "opt_wt": 0.3},
    "cmaml": {"learn_lr": False, "sync_update": True, "opt_lr": 0.1, "opt_wt": 0.1},
}


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_observe_matches_hand_written_update(variant, vectorize):
    cfg = VARIANTS[variant]
    m = make(glances=1, memories=50, replay_batch_size=3, alpha_init=0.15, grad_clip_norm=0.5,
             vectorize=vectorize, **cfg)
    mx, my, mt = batch(8)
    m.memory.add(mx, my, mt)
    x, y, t = batch(4)
    w0 = [p.detach().clone() for p in m.backbone.parameters()]
    a0 = [a.detach().clone() for a in m.alpha]

    perm, idx = replay_rng(7, 4, 8, 3)
    xs, ys = x[perm], y[perm]
    bx, by = torch.cat([mx[idx], xs]), torch.cat([my[idx], ys])
    w_exp, a_exp = expected_lamaml(w0, a0, xs, ys, bx, by, opt_lr=cfg["opt_lr"],
                                   opt_wt=cfg["opt_wt"], learn_lr=cfg["learn_lr"],
                                   sync=cfg["sync_update"], clip=0.5)
    torch.manual_seed(7)
    m.observe(x, y, t)

    for p, e in zip(m.backbone.parameters(), w_exp):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    for a, e in zip(m.alpha, a_exp):
        torch.testing.assert_close(a.detach(), e, rtol=1e-5, atol=1e-6)
    moved = max((p.detach() - q).abs().max() for p, q in zip(m.backbone.parameters(), w0))
    assert moved > 1e-4
    if variant == "cmaml":  # (2) C-MAML: the step sizes never move
        assert all(torch.equal(a.detach(), b) for a, b in zip(m.alpha, a0))
    else:
        assert any(not torch.equal(a.detach(), b) for a, b in zip(m.alpha, a0))


def test_sync_step_is_sgd_not_relu_alpha():
    """(3) Sync-La-MAML: w moves by exactly opt_wt * clipped meta-gradient."""
    m = make(glances=1, memories=0, learn_lr=True, sync_update=True, opt_wt=0.3, alpha_init=-0.2,
             grad_clip_norm=None)
    x, y, t = batch(3)
    torch.manual_seed(1)
    perm = torch.randperm(3)
    _, gw, _ = m.meta_gradients(x[perm], y[perm], x[perm], y[perm], t, need_alpha=True)
    w0 = [p.detach().clone() for p in m.backbone.parameters()]
    torch.manual_seed(1)
    m.observe(x, y, t)
    # With alpha < 0 an async step would not move the weights at all (relu(alpha) = 0).
    for p, q, g in zip(m.backbone.parameters(), w0, gw):
        torch.testing.assert_close(p.detach(), q - 0.3 * g)


def test_async_step_uses_updated_relu_alpha():
    m = make(glances=1, memories=0, learn_lr=True, sync_update=False, alpha_init=0.01,
             opt_lr=100.0, grad_clip_norm=None)
    x, y, t = batch(3)
    w0 = [p.detach().clone() for p in m.backbone.parameters()]
    m.observe(x, y, t)
    # The large opt_lr drives some step sizes below zero: relu(alpha_new) = 0 freezes exactly
    # those weights, every other weight moves.
    frozen = [a.detach() <= 0 for a in m.alpha]
    assert any(f.any() for f in frozen) and not all(f.all() for f in frozen)
    for p, q, f in zip(m.backbone.parameters(), w0, frozen):
        assert torch.equal(p.detach()[f], q[f])
        assert (p.detach()[~f] != q[~f]).float().mean() > 0.5


# ----------------------------------------------------------------------- (4) first/second order
def test_second_order_adds_exactly_the_hessian_term():
    """One inner step on the whole batch: d/dw L(w - lr*g(w)) = v - H (lr * v), v = dL(w1)."""
    m = make(inner_batches=1, second_order=True, alpha_init=0.3, grad_clip_norm=None)
    x, y, _ = batch(4)
    bx, by, bt = batch(6)
    _, g2, a2 = m.meta_gradients(x, y, bx, by, bt)
    m.second_order = False
    _, g1, a1 = path_gradients(m, False, x, y, bx, by, bt)
    _, g1v, a1v = path_gradients(m, True, x, y, bx, by, bt)

    w = [p.detach().clone().requires_grad_() for p in m.backbone.parameters()]
    lr = [a.detach().relu() for a in m.alpha]
    g = torch.autograd.grad(F.cross_entropy(two_layer(x, w), y), w, create_graph=True)
    w1 = [p - s * gi for p, s, gi in zip(w, lr, g)]
    v = torch.autograd.grad(F.cross_entropy(two_layer(bx, w1), by), w1, retain_graph=True)
    # First order treats g as a constant: the meta-gradient is v itself.
    for a, b in zip(g1, v):
        torch.testing.assert_close(a, b)
    for a, b in zip(g1v, v):
        torch.testing.assert_close(a, b)
    # Second order adds -H (lr * v), a Hessian-vector product through the inner gradient.
    hvp = torch.autograd.grad(g, w, grad_outputs=[s * vi for s, vi in zip(lr, v)])
    for a, b, h in zip(g2, v, hvp):
        torch.testing.assert_close(a, b - h)
    assert max((a - b).abs().max() for a, b in zip(g2, g1)) > 1e-4
    # The alpha gradient is -g * v (times relu') in both orders, g evaluated at w.
    for a, gi, vi, al in zip(a1, g, v, m.alpha):
        torch.testing.assert_close(a, -(gi.detach() * vi) * (al.detach() > 0))
    for a, b, c in zip(a1v, a1, a2):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)


@pytest.mark.parametrize("inner_batches", [None, 3])
@pytest.mark.parametrize("clamp", [None, 0.05])
@pytest.mark.parametrize("every", [True, False])
def test_fast_first_order_path_equals_autograd_loop(inner_batches, clamp, every):
    m = make(inner_batches=inner_batches, inner_grad_clamp=clamp, alpha_init=0.2,
             inner_lr_relu=inner_batches is None)
    with torch.no_grad():  # some negative step sizes, to exercise relu'
        m.alpha[0][:2] = -0.1
    x, y, _ = batch(7)
    bx, by, bt = batch(9)
    ref = path_gradients(m, False, x, y, bx, by, bt, every=every)
    fast = path_gradients(m, True, x, y, bx, by, bt, every=every)
    torch.testing.assert_close(fast[0], ref[0])
    for a, b in zip(fast[1] + fast[2], ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fast_path_on_a_cnn():
    torch.manual_seed(0)
    info = TaskInfo(2, (3, 8, 8), 4, ((0, 1), (2, 3)), "class")
    m = LaMAML(PcCNN((3, 8, 8), 4, channels=4, n_conv=2, hidden=8), info, inner_batches=2)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([2, 3, 3, 2])
    bx, by, bt = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 2]), torch.tensor(
        [0, 0, 1, 1, 0, 1])
    m._task = 1
    ref = path_gradients(m, False, x, y, bx, by, bt)
    fast = path_gradients(m, True, x, y, bx, by, bt)
    for a, b in zip(fast[1] + fast[2], ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------- (5) checkpointing
def test_memory_alpha_and_age_survive_state_dict():
    m = make(memories=5, replay_batch_size=2, use_old_task_memory=True, glances=2)
    for task in range(2):
        m.before_task(task, None)
        for _ in range(3):
            m.observe(*batch(4, task))
    state = m.state_dict()
    assert {"alpha.0", "memory.x", "memory.age", "old_memory.x", "task_counter"} <= set(state)

    fresh = make(memories=5, replay_batch_size=2, use_old_task_memory=True, glances=2)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.alpha, m.alpha):
        assert torch.equal(a, b)
    assert not torch.equal(m.alpha[0], torch.full_like(m.alpha[0], 0.15))
    for name in ("x", "y", "t", "age"):
        assert torch.equal(getattr(fresh.memory, name), getattr(m.memory, name))
        assert torch.equal(getattr(fresh.old_memory, name), getattr(m.old_memory, name))
    assert len(fresh.memory) == len(m.memory) == 5 and int(fresh.memory.age) == 24
    assert fresh._task == 1 and fresh.replay_source() is fresh.old_memory
    # Training goes on identically from the restored state.
    x, y, t = batch(4, 1)
    torch.manual_seed(3)
    m.observe(x, y, t)
    torch.manual_seed(3)
    fresh.observe(x, y, t)
    for a, b in zip(fresh.parameters(), m.parameters()):
        assert torch.equal(a, b)


def test_memory_is_filled_on_the_first_glance_of_the_first_epoch_only():
    m = make(memories=100, glances=3)
    m.observe(*batch(4))
    assert int(m.memory.age) == 4  # not 12: one push per incoming batch


def test_old_task_memory_is_a_snapshot_of_the_task_start():
    m = make(memories=10, use_old_task_memory=True)
    m.before_task(0, None)
    m.observe(*batch(4, 0))
    assert m.replay_source() is m.memory  # task 0 replays from the live memory
    m.before_task(1, None)
    snapshot = m.old_memory.x.clone()
    m.observe(*batch(4, 1))
    assert int(m.memory.age) == 8 and len(m.old_memory) == 4
    assert torch.equal(m.old_memory.x, snapshot)


# ----------------------------------------------------------------------- (6) multi-head masks
@pytest.mark.parametrize("vectorize", [True, False])
def test_multi_head_masks_inner_and_meta_losses(vectorize):
    """Inner loss on the current task's classes; meta-loss on each sample's own task's classes.

    Written as the reference does it: slice the task's logit columns, shift the labels.
    """
    m = make(info=class_info(), inner_batches=2, alpha_init=0.2, vectorize=vectorize)
    m._task = 1
    x, y, _ = batch(4, 1, classes=(2, 3))
    bx = torch.randn(5, *SHAPE)
    by, bt = torch.tensor([0, 1, 2, 3, 3]), torch.tensor([0, 0, 1, 1, 1])
    loss, gw, ga = m.meta_gradients(x, y, bx, by, bt)

    w = [p.detach().clone().requires_grad_() for p in m.backbone.parameters()]
    alpha = [a.detach().clone().requires_grad_() for a in m.alpha]
    fast, metas = w, []
    for xk, yk in zip(x.split(2), y.split(2)):
        inner = F.cross_entropy(two_layer(xk, fast)[:, 2:4], yk - 2)
        g = torch.autograd.grad(inner, fast)
        fast = [f - a.relu() * gi for f, a, gi in zip(fast, alpha, g)]
        logits = two_layer(bx, fast)
        per_sample = [F.cross_entropy(logits[i : i + 1, 2 * u : 2 * u + 2], by[i : i + 1] - 2 * u)
                      for i, u in enumerate(bt.tolist())]
        metas.append(sum(per_sample) / len(per_sample))
    meta = sum(metas) / len(metas)
    expected = torch.autograd.grad(meta, w + alpha)
    torch.testing.assert_close(loss, meta.detach())
    for a, b in zip(gw + ga, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------- La-ER
def test_la_er_matches_hand_written_update():
    m = make(LaER, glances=1, memories=20, replay_batch_size=2, inner_batches=2, alpha_init=0.1,
             opt_lr=0.5, grad_clip_norm=1.0, inner_grad_clamp=0.01)
    mx, my, mt = batch(5)
    m.memory.add(mx, my, mt)
    x, y, t = batch(4)
    w = [p.detach().clone().requires_grad_() for p in m.backbone.parameters()]
    alpha = [a.detach().clone().requires_grad_() for a in m.alpha]
    perm, idx = replay_rng(5, 4, 5, 2)
    xs, ys = x[perm], y[perm]
    bx, by = torch.cat([mx[idx], xs]), torch.cat([my[idx], ys])

    fast = w
    for xk, yk in zip(xs.split(2), ys.split(2)):
        g = torch.autograd.grad(F.cross_entropy(two_layer(xk, fast), yk), fast)
        fast = [f - a * gi.clamp(-0.01, 0.01) for f, a, gi in zip(fast, alpha, g)]  # no relu
    meta = F.cross_entropy(two_layer(bx, fast), by)  # last fast weights only
    ga = clipped(torch.autograd.grad(meta, alpha), 1.0)
    new_alpha = [a.detach() - 0.5 * g for a, g in zip(alpha, ga)]
    er = F.cross_entropy(two_layer(bx, w), by)
    gw = clipped(torch.autograd.grad(er, w), 1.0)
    new_w = [p.detach() - a.relu() * g for p, a, g in zip(w, new_alpha, gw)]

    torch.manual_seed(5)
    m.observe(x, y, t)
    for p, e in zip(list(m.backbone.parameters()) + list(m.alpha), new_w + new_alpha):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert int(m.memory.age) == 9  # La-ER offers the batch after its glances, every epoch


@pytest.mark.parametrize("info", [domain_info(), class_info()], ids=["domain", "class"])
@pytest.mark.parametrize("relu_lr", [True, False])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("zero_pixels", [False, True])
def test_hand_written_mlp_glance_equals_autograd_loop(info, relu_lr, tail, zero_pixels):
    """The MLP glance (lamaml_mlp.py) on a three-layer MLP: same loss and meta-gradients,
    also when some pixels are zero in every incoming sample (the glance skips them)."""
    torch.manual_seed(0)
    m = LaMAML(MLP(SHAPE, N_OUT, hidden=(5, 3)), info, alpha_init=0.2, inner_lr_relu=relu_lr)
    with torch.no_grad():  # some negative step sizes, to exercise relu'
        m.alpha[0][:2] = -0.1
        m.alpha[2][0] = -0.1
    m._task = 1 if info.multi_head else 0
    classes = info.task_classes[m._task]
    x, y, _ = batch(6, classes=classes)
    bx, by, bt = batch(5, classes=info.task_classes[0])
    if zero_pixels:  # background pixels in every incoming sample (skipped by the glance)
        x[..., 0, :] = 0.0
    if tail:  # as observe builds it: memory rows, then the incoming batch
        bx, by = torch.cat([bx, x]), torch.cat([by, y])
        bt = torch.cat([bt, torch.full((6,), m._task)])
    assert m.mlp_path
    ref = path_gradients(m, False, x, y, bx, by, bt)
    m.vectorize = True
    m.begin_update(x, y)
    assert type(m._ws).__name__ == "MLPGlance"
    m._ws = None
    fast = m.meta_gradients(x, y, bx, by, bt)  # incoming_in_meta=False: checks both layouts
    if tail:
        m.begin_update(x, y)
        loss, gw, ga = m.glance_gradients(x, y, bx, by, bt, incoming_in_meta=True)
        gw, ga = m._ws.views(gw[0]), m._ws.views(ga[0])  # flat (W1 stored transposed)
        m._ws = None
        torch.testing.assert_close(loss, ref[0])
        for a, b in zip(gw + ga, ref[1] + ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast[0], ref[0])
    for a, b in zip(fast[1] + fast[2], ref[1] + ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_mlp_takes_the_autograd_paths():
    """The hand-written passes compute a plain MLP: with dropout, La-MAML and MER use autograd."""
    from metacl.methods.mer import MER

    torch.manual_seed(0)
    m = LaMAML(MLP(SHAPE, N_OUT, hidden=(5,), dropout=0.5), domain_info())
    assert not m.mlp_path and m.fast_path
    assert make().mlp_path
    mer = MER(MLP(SHAPE, N_OUT, hidden=(5,), dropout=0.5), domain_info())
    called = []
    mer._observe_autograd = lambda *a: called.append(True)
    mer.observe(*batch(2))
    assert called
