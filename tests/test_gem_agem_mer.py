"""GEM, A-GEM and MER: projections, memories, the Reptile update, and state_dict round trips."""

import math

import pytest
import torch
import torch.nn.functional as F

from metacl.memory import RingBuffer
from metacl.methods.agem import AGEM, agem_project
from metacl.methods.gem import GEM, gem_project
from metacl.methods.mer import MER
from metacl.models.backbones import MLP, ResNet18
from metacl.task_info import TaskInfo


def domain_info(n_tasks=3, shape=(1, 4, 4), n_out=3):
    return TaskInfo(n_tasks, shape, n_out, tuple(tuple(range(n_out)) for _ in range(n_tasks)),
                    "domain")


def class_info(n_tasks=3, shape=(1, 4, 4), per_task=2):
    classes = tuple(tuple(range(per_task * u, per_task * (u + 1))) for u in range(n_tasks))
    return TaskInfo(n_tasks, shape, per_task * n_tasks, classes, "class")


def detached(method):
    """Let observe() run without a Trainer: plain optimizer, plain backward."""
    method.optimizers = lambda: method.optimizer
    method.manual_backward = lambda loss: loss.backward()
    return method


def params_vector(method):
    return torch.cat([p.detach().reshape(-1) for p in method.backbone.parameters()]).clone()


# ---------------------------------------------------------------------------- ring buffer
def test_ring_buffer_keeps_each_tasks_latest_samples():
    ring = RingBuffer(n_tasks=3, n_memories=4, input_shape=(2,))
    xs = torch.arange(20, dtype=torch.float32)[:, None].expand(20, 2)
    ring.add(xs[:3], torch.arange(3), 0)
    assert ring.size(0) == 3 and ring.size(1) == 0 and len(ring) == 3
    ring.add(xs[3:6], torch.arange(3, 6), 0)  # wraps: 0..5 into 4 slots keeps 2..5
    x, y = ring.task(0)
    assert sorted(y.tolist()) == [2, 3, 4, 5] and torch.equal(x[:, 0].long(), y)
    # A batch larger than the ring: only its last n_memories samples stay.
    ring.add(xs[6:15], torch.arange(6, 15), 1)
    assert sorted(ring.task(1)[1].tolist()) == [11, 12, 13, 14]
    # Per-sample task ids, interleaved.
    t = torch.tensor([2, 0, 2, 0, 2])
    ring.add(xs[15:20], torch.arange(15, 20), t)
    assert sorted(ring.task(2)[1].tolist()) == [15, 17, 19]
    assert sorted(ring.task(0)[1].tolist()) == [4, 5, 16, 18]
    assert ring.count.tolist() == [8, 9, 3]
    assert ring.stored_tasks() == [0, 1, 2] and ring.stored_tasks(below=1) == [0]
    x, y, valid = ring.tasks([0, 2])
    assert x.shape == (2, 4, 2) and valid.tolist() == [[True] * 4, [True] * 3 + [False]]
    assert torch.equal(y[1][valid[1]].sort().values, torch.tensor([15, 17, 19]))


def test_ring_buffer_samples_only_from_earlier_tasks():
    ring = RingBuffer(n_tasks=3, n_memories=5, input_shape=(1,))
    ring.add(torch.zeros(3, 1), torch.arange(3), 0)  # task 0 not full
    ring.add(torch.ones(5, 1), torch.arange(10, 15), 1)
    ring.add(torch.ones(5, 1), torch.arange(20, 25), 2)
    x, y, t = ring.sample(100, below=2)
    assert len(y) == 8 and len(set(y.tolist())) == 8  # every stored sample of tasks 0-1, once
    assert set(y.tolist()) == {0, 1, 2, 10, 11, 12, 13, 14}
    assert torch.equal(t, torch.where(y < 10, 0, 1))
    assert torch.equal(x[:, 0], t.float())  # samples travel with their labels
    _, y, _ = ring.sample(4, below=1)
    assert len(y) == 3 and set(y.tolist()) == {0, 1, 2}
    assert len(ring.sample(4, below=0)[1]) == 0


# ---------------------------------------------------------------------------- GEM
def test_gem_projection_satisfies_every_constraint_and_is_the_closest():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4, 30, generator=gen)
    g = -G[0] - 0.5 * G[2] + 0.1 * torch.randn(30, generator=gen)  # conflicts with tasks 0, 2
    assert (G @ g < 0).any()
    for margin in (0.0, 0.5):
        proj = gem_project(g, G, margin=margin, eps=0.0)
        dots = G @ proj
        assert (dots >= -1e-4).all(), dots
    # KKT of eq. 10 (margin 0): proj - g = G^T v with v >= 0, and v_k > 0 only on active
    # constraints (<proj, g_k> = 0). Recover v by least squares, independently of the QP.
    proj = gem_project(g, G, margin=0.0, eps=0.0)
    v = torch.linalg.lstsq(G.T.double(), (proj - g).double()[:, None]).solution[:, 0]
    assert torch.allclose(G.T.double() @ v, (proj - g).double(), atol=1e-4)
    assert (v >= -1e-5).all()
    assert torch.allclose(v * (G.double() @ proj.double()), torch.zeros(4, dtype=torch.double),
                          atol=1e-4)


def test_gem_projection_keeps_a_gradient_without_conflict():
    G = torch.eye(3, 10)
    g = torch.arange(10, dtype=torch.float32)  # dots 0, 1, 2: no conflict
    assert torch.equal(gem_project(g, G, margin=0.5), g)


def test_gem_vmapped_memory_gradients_match_a_loop():
    torch.manual_seed(0)
    info = class_info(n_tasks=4)
    gem = GEM(MLP(info.input_shape, info.n_outputs, hidden=[8]), info, n_memories=5,
              grad_clip_norm=None)
    for u in range(3):
        n = 5 if u != 1 else 3  # task 1's ring is not full: its empty slots must not count
        gem.memory.add(torch.randn(n, *info.input_shape), torch.randint(2 * u, 2 * u + 2, (n,)), u)
    assert gem.vectorise
    G_vmap = gem.memory_grads([0, 1, 2])
    gem.vectorise = False
    G_loop = gem.memory_grads([0, 1, 2])
    assert torch.allclose(G_vmap, G_loop, atol=1e-6)
    # Batch norm running statistics cannot be written under vmap: GEM loops then.
    assert not GEM(ResNet18((3, 32, 32), 10), class_info(shape=(3, 32, 32))).vectorise


def test_gem_step_never_raises_a_past_tasks_memory_loss_to_first_order():
    torch.manual_seed(1)
    info = domain_info(n_tasks=3)
    lr = 0.05
    gem = detached(GEM(MLP(info.input_shape, info.n_outputs, hidden=[16]), info, lr=lr,
                       n_memories=6, memory_strength=0.0, grad_clip_norm=None, glances=1))
    for u in range(2):
        gem.before_task(u, None)
        x, y = torch.randn(6, *info.input_shape), torch.randint(0, 3, (6,))
        gem.observe(x, y, torch.full((6,), u))
    gem.before_task(2, None)
    conflicts = 0
    for _ in range(10):
        # An incoming batch whose labels fight the memories: the gradient often conflicts.
        x, y = torch.randn(6, *info.input_shape), torch.randint(0, 3, (6,))
        G = gem.memory_grads([0, 1])
        theta = params_vector(gem)
        gem.zero_grad()
        gem.loss(gem.backbone(x), y, 2).backward()
        g = torch.cat([p.grad.reshape(-1) for p in gem.backbone.parameters()])
        conflicts += bool((G @ g < 0).any())
        gem.observe(x, y, torch.full((6,), 2))
        applied = (theta - params_vector(gem)) / lr
        # Non-negative up to GEM's 1e-3 diagonal regulariser of the QP (times v, here < 1).
        assert (G @ applied >= -1e-3).all()
        if not (G @ g < 0).any():
            assert torch.allclose(applied, g, atol=1e-5)
    assert conflicts > 0


# ---------------------------------------------------------------------------- A-GEM
def test_agem_projection():
    g_ref = torch.tensor([1.0, 0.0, 1.0])
    g = torch.tensor([-2.0, 1.0, 0.0])  # <g, g_ref> = -2
    proj = agem_project(g, g_ref)
    assert torch.allclose(proj, torch.tensor([-1.0, 1.0, 1.0]))  # g - (-2 / 2) g_ref
    assert abs(float(proj @ g_ref)) < 1e-6
    g = torch.tensor([2.0, 1.0, -1.0])  # <g, g_ref> = 1: kept exactly
    assert torch.equal(agem_project(g, g_ref), g)


def test_agem_uses_task_zeros_memory_as_reference():
    torch.manual_seed(2)
    info = class_info(n_tasks=3)
    lr = 0.05
    agem = detached(AGEM(MLP(info.input_shape, info.n_outputs, hidden=[16]), info, lr=lr,
                         n_memories=4, ref_batch_size=256, grad_clip_norm=None, glances=1))
    agem.before_task(0, None)
    assert agem.reference_grad() is None  # nothing to protect while task 0 trains
    x0, y0 = torch.randn(4, *info.input_shape), torch.randint(0, 2, (4,))
    agem.observe(x0, y0, torch.zeros(4, dtype=torch.long))
    agem.before_task(1, None)
    assert agem.memory.stored_tasks(below=1) == [0]
    # The reference is the gradient on all of task 0's memory (ref batch >= what is stored).
    g_ref = agem.reference_grad()
    agem.zero_grad()
    agem.loss(agem.backbone(x0), y0, 0).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in agem.backbone.parameters()])
    assert torch.allclose(g_ref, expected, atol=1e-6)
    # Task-1 steps never point against it; without conflict the plain gradient is applied.
    for _ in range(10):
        x, y = torch.randn(4, *info.input_shape), torch.randint(2, 4, (4,))
        g_ref, theta = agem.reference_grad(), params_vector(agem)
        agem.zero_grad()
        agem.loss(agem.backbone(x), y, 1).backward()
        g = torch.cat([p.grad.reshape(-1) for p in agem.backbone.parameters()])
        agem.observe(x, y, torch.ones(4, dtype=torch.long))
        applied = (theta - params_vector(agem)) / lr
        assert float(applied @ g_ref) >= -1e-5
        if float(g @ g_ref) >= 0:
            assert torch.allclose(applied, g, atol=1e-5)


# ---------------------------------------------------------------------------- MER
def _softmax_grad(W, b, x, y):
    """Hand-written gradient of cross-entropy for logits W x + b."""
    p = torch.softmax(W @ x + b, dim=0)
    p[y] -= 1.0
    return torch.outer(p, x), p


def test_mer_matches_hand_computed_reptile_update():
    torch.manual_seed(3)
    info = domain_info(n_tasks=1, shape=(2,), n_out=3)
    lr, beta, gamma = 0.3, 0.25, 0.5
    mer = detached(MER(MLP((2,), 3, hidden=[]), info, lr=lr, memories=5, replay_batch_size=4,
                       batches_per_example=2, beta=beta, gamma=gamma, grad_clip_norm=None))
    xm, ym = torch.tensor([[0.5, -1.0]]), torch.tensor([2])
    mer.memory.add(xm, ym, torch.zeros(1, dtype=torch.long))  # the only memory
    W0, b0 = (p.detach().clone().double() for p in mer.backbone.parameters())
    xc, yc = torch.tensor([[1.0, 2.0]]), torch.tensor([0])

    # Expected: each batch is [current, memory]; two SGD steps, then Reptile with beta;
    # two batches; then Reptile with gamma from the starting weights.
    W, b = W0.clone(), b0.clone()
    for _ in range(2):
        Wa, ba = W.clone(), b.clone()
        for xs, ys in ((xc[0], int(yc)), (xm[0], int(ym))):
            gW, gb = _softmax_grad(W, b, xs.double(), ys)
            W, b = W - lr * gW, b - lr * gb
        W, b = Wa + beta * (W - Wa), ba + beta * (b - ba)
    W, b = W0 + gamma * (W - W0), b0 + gamma * (b - b0)

    mer.observe(xc, yc, torch.zeros(1, dtype=torch.long))
    W_mer, b_mer = mer.backbone.parameters()
    assert torch.allclose(W_mer.double(), W, atol=1e-6)
    assert torch.allclose(b_mer.double(), b, atol=1e-6)
    assert len(mer.memory) == 2  # the incoming sample was offered to the reservoir afterwards


def test_mer_clips_each_single_sample_step():
    info = domain_info(n_tasks=1, shape=(2,), n_out=3)
    mer = detached(MER(MLP((2,), 3, hidden=[]), info, lr=1.0, memories=5, replay_batch_size=0,
                       batches_per_example=1, beta=1.0, gamma=1.0, grad_clip_norm=0.01))
    before = params_vector(mer)
    mer.observe(torch.tensor([[100.0, -100.0]]), torch.tensor([1]), torch.zeros(1, dtype=torch.long))
    assert math.isclose(float((params_vector(mer) - before).norm()), 0.01, rel_tol=1e-3)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cls", [GEM, AGEM, MER])
def test_state_dict_round_trip_restores_memory(cls):
    torch.manual_seed(4)
    info = class_info(n_tasks=3)
    kwargs = {"memories": 6, "batches_per_example": 2} if cls is MER else {"n_memories": 3}

    def build():
        return detached(cls(MLP(info.input_shape, info.n_outputs, hidden=[8]), info,
                            batch_size=4, **kwargs))

    method = build()
    for u in range(2):
        method.before_task(u, None)
        for _ in range(2):
            x, y = torch.randn(4, *info.input_shape), torch.randint(2 * u, 2 * u + 2, (4,))
            method.observe(x, y, torch.full((4,), u))
    state = method.state_dict()
    fresh = build()
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert len(fresh.memory) == len(method.memory) > 0
    assert int(fresh.task_counter) == 1
    if cls is not MER:
        assert fresh.memory.stored_tasks() == [0, 1]
        for u in (0, 1):
            assert torch.equal(fresh.memory.task(u)[0], method.memory.task(u)[0])
    x = torch.randn(5, *info.input_shape)
    assert torch.equal(fresh.predict(x, 1), method.predict(x, 1))
    assert F.mse_loss(fresh.backbone(x), method.backbone(x)) == 0


@pytest.mark.parametrize("multi_head", [False, True])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_mer_hand_written_mlp_path_equals_autograd_path(multi_head, clip):
    """MER on an MLP runs on flat weights with metacl.models.mlp_grad; same update as autograd."""
    info = class_info() if multi_head else domain_info()
    n_out = info.n_outputs

    def run(path):
        torch.manual_seed(5)
        mer = detached(MER(MLP((1, 4, 4), n_out, hidden=[6, 5]), info, lr=0.2, memories=6,
                           replay_batch_size=3, batches_per_example=2, beta=0.3, gamma=0.7,
                           grad_clip_norm=clip))
        g = torch.Generator().manual_seed(1)
        for task in (0, 1):
            x = torch.randn(4, 1, 4, 4, generator=g)
            y = torch.tensor(info.task_classes[task])[torch.randint(0, 2, (4,), generator=g)]
            t = torch.full((4,), task)
            mer.before_task(task, None)
            loss = getattr(mer, path)(x, y, t)
        return params_vector(mer), loss, mer.memory.x.clone()

    fast, slow = run("_observe_mlp"), run("_observe_autograd")
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[2], slow[2])  # same reservoir decisions
    assert (fast[0] - run("_observe_mlp")[0]).abs().max() == 0  # and deterministic
