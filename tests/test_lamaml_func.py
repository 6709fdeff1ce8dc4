"""La-MAML's glance as a pure function (metacl.methods.lamaml_func), checked against the method.

(a) `glance` for one member equals `LaMAML._glance_autograd` (the literal loop, autograd through
    the inner steps) on the same weights, step sizes and data, for an MLP and a small pc_cnn;
(b) `vmap_glance` over N=3 members (different weights, step sizes, data, class masks) equals
    the 3 single calls;
(c) the stacked `outer_step` with per-member opt_lr / opt_wt equals `LaMAML.outer_step` run
    member by member; and a few glances of a whole population equal its separate members.
"""

from __future__ import annotations

import pytest
import torch

from metacl.methods import lamaml_func as lf
from metacl.methods.lamaml import LaMAML
from metacl.models import MLP, PcCNN
from metacl.task_info import TaskInfo

N_OUT = 4
TASK = 1  # the task being trained: the inner loss is masked to its classes
# One class order per member: each member of a class-split population has its own masks.
CLASS_ORDERS = (((0, 1), (2, 3)), ((3, 1), (0, 2)), ((2, 0), (1, 3)))
BACKBONES = {
    "mlp": ((1, 2, 3), lambda shape: MLP(shape, N_OUT, hidden=(5, 3))),
    "pc_cnn": ((3, 32, 32), lambda shape: PcCNN(shape, N_OUT, channels=4, n_conv=3, hidden=8)),
}
# Tensor-wise tolerances: |got - expected| <= TOL * max(1, max |expected|) for every element.
# Relative to the tensor's scale, not to each element: a gradient element that is the small
# difference of large terms carries the rounding of those terms (float32 conv gradients of size
# ~10-50 after single-sample inner steps differ by ~1e-4 between summation orders).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# vmap over members against single calls, float32: the batched kernels (a grouped convolution
# for the members' conv weights) sum in another order. Measured: up to 7.6e-6 of the tensor's
# scale (second-order pc_cnn, single-sample inner steps, whose Jacobians amplify rounding);
# float64 agrees to 1e-14 there. 3e-5 keeps other CPUs' kernels from failing the test.
VMAP_TOL = {torch.float64: 1e-10, torch.float32: 3e-5}


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared 2-core CPU
    yield
    torch.set_num_threads(previous)


def task_info(shape, multi_head: bool, member: int = 0) -> TaskInfo:
    if multi_head:
        return TaskInfo(2, shape, N_OUT, CLASS_ORDERS[member], "class")
    return TaskInfo(2, shape, N_OUT, ((0, 1, 2, 3),) * 2, "domain")


def member_data(shape, info: TaskInfo, dtype, seed: int, n_in: int = 4, n_meta: int = 6):
    """A member's weights' data: incoming batch of task TASK, meta-batch of tasks 0 and 1, each
    label among its own task's classes."""
    g = torch.Generator().manual_seed(seed)

    def labels(tasks):
        classes = [info.task_classes[t] for t in tasks.tolist()]
        pick = torch.randint(0, N_OUT, (len(classes),), generator=g).tolist()
        return torch.tensor([c[i % len(c)] for c, i in zip(classes, pick)])

    x = torch.randn(n_in, *shape, generator=g, dtype=dtype)
    y = labels(torch.full((n_in,), TASK))
    bx = torch.randn(n_meta, *shape, generator=g, dtype=dtype)
    bt = torch.tensor([0, 1] * (n_meta // 2))
    return x, y, bx, labels(bt), bt


def member_weights(net, dtype, seed: int):
    """Weights (the backbone's init under `seed`, perturbed) and step sizes around 0.1 (the
    configs' alpha_init: 0.1-0.15), a few of them negative (to exercise relu')."""
    g = torch.Generator().manual_seed(1000 + seed)
    w = tuple(p.detach().to(dtype) + 0.05 * torch.randn(p.shape, generator=g, dtype=dtype)
              for p in net.parameters())
    a = tuple(0.1 + 0.05 * torch.randn(p.shape, generator=g, dtype=dtype) for p in w)
    for ai in a:
        ai.view(-1)[:2] = -0.05
    return w, a


def lamaml_like(net, info, w, a, dtype, **kwargs) -> LaMAML:
    """A LaMAML on `net` holding the weights w and step sizes a (vectorize=false: the literal
    loop for the meta-losses too)."""
    m = LaMAML(net, info, vectorize=False, **kwargs).to(dtype)
    with torch.no_grad():
        for p, v in zip(list(m.backbone.parameters()) + list(m.alpha), w + a):
            p.copy_(v)
    m._task = TASK
    return m


def options(inner_batches, second_order, clamp, every, **extra):
    return dict(inner_batches=inner_batches, second_order=second_order, inner_grad_clamp=clamp,
                inner_lr_relu=inner_batches is None, meta_every_step=every, **extra)


def method_kwargs(opts):
    return {k: opts[k] for k in ("inner_batches", "second_order", "inner_grad_clamp",
                                  "inner_lr_relu")}


def assert_all_close(got, expected, dtype, tol=TOL):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        scale = max(1.0, float(e.abs().max()))
        torch.testing.assert_close(g, e, rtol=0.0, atol=tol[dtype] * scale)


def build(backbone: str, dtype, multi_head: bool, member: int = 0):
    shape, make = BACKBONES[backbone]
    torch.manual_seed(member)
    net = make(shape)
    info = task_info(shape, multi_head, member)
    w, a = member_weights(net, dtype, member)
    return shape, net, info, w, a


# ----------------------------------------------------------------------- (a) one member
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stack_steps", [True, False], ids=["stacked", "loop"])
@pytest.mark.parametrize("every", [True, False], ids=["every", "last"])
@pytest.mark.parametrize("multi_head", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("clamp", [None, 0.05], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("inner_batches", [None, 2], ids=["samples", "chunks2"])
@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_glance_equals_glance_autograd(backbone, second_order, inner_batches, clamp, multi_head,
                                       every, stack_steps, dtype):
    shape, net, info, w, a = build(backbone, dtype, multi_head)
    opts = options(inner_batches, second_order, clamp, every, stack_steps=stack_steps)
    m = lamaml_like(net, info, w, a, dtype, **method_kwargs(opts))
    x, y, bx, by, bt = member_data(shape, info, dtype, seed=0)
    loss, gw, ga = m._glance_autograd(x, y, bx, by, bt, True, True, every)

    mask = info.class_mask() if multi_head else None
    got = lf.glance(net, w, a, x, y, bx, by, bt, mask, TASK, **opts)
    assert_all_close([got[0]], [loss], dtype)
    assert_all_close(got[1], gw, dtype)
    assert_all_close(got[2], ga, dtype)
    assert all(g.dtype == dtype for g in got[1] + got[2])
    if multi_head:  # the masks matter: the unmasked loss is another number
        unmasked = lf.glance(net, w, a, x, y, bx, by, bt, None, TASK, **opts)
        assert not torch.allclose(unmasked[0], loss)


@pytest.mark.parametrize("stack_steps", [True, False], ids=["stacked", "loop"])
@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("need", [(False, True), (True, False)], ids=["alpha_only", "w_only"])
def test_glance_need_flags_equal_glance_autograd(need, second_order, stack_steps):
    """La-ER's call (alpha only, last fast weights, alpha itself as the inner step, clamped)
    and C-MAML's (weights only)."""
    need_w, need_alpha = need
    dtype = torch.float64
    shape, net, info, w, a = build("mlp", dtype, multi_head=True)
    opts = options(2, second_order, 2.0, every=need_w, need_w=need_w, need_alpha=need_alpha,
                   stack_steps=stack_steps)
    opts["inner_lr_relu"] = False
    m = lamaml_like(net, info, w, a, dtype, **method_kwargs(opts))
    x, y, bx, by, bt = member_data(shape, info, dtype, seed=0)
    loss, gw, ga = m._glance_autograd(x, y, bx, by, bt, need_w, need_alpha, need_w)
    got = lf.glance(net, w, a, x, y, bx, by, bt, info.class_mask(), TASK, **opts)
    assert_all_close([got[0]], [loss], dtype)
    assert_all_close(got[1], gw or (), dtype)
    assert_all_close(got[2], ga or (), dtype)
    assert (got[1] == ()) != need_w and (got[2] == ()) != need_alpha


def test_loss_and_grad_equals_loss_gradient():
    """La-ER's weight gradient: the plain meta-batch loss at w."""
    dtype = torch.float64
    shape, net, info, w, a = build("pc_cnn", dtype, multi_head=True)
    m = lamaml_like(net, info, w, a, dtype)
    m.vectorize = False  # module parameters, no workspace
    _, _, bx, by, bt = member_data(shape, info, dtype, seed=0)
    loss, g = m.loss_gradient(bx, by, bt)
    got = lf.loss_and_grad(net, w, bx, by, bt, info.class_mask())
    assert_all_close([got[0]], [loss], dtype)
    assert_all_close(got[1], g, dtype)

    # Over 3 members (own weights, meta-batches and class masks) under vmap.
    net, members, data, masks = population("pc_cnn", dtype, multi_head=True)
    W = lf.stack([m[3] for m in members])
    bx, by, bt = (torch.stack(d) for d in list(zip(*data))[2:])
    loss, gw = lf.vmap_loss_and_grad(net, W, bx, by, bt, torch.stack(masks))
    for k, (_, _, _, w, _) in enumerate(members):
        single = lf.loss_and_grad(net, w, *data[k][2:], masks[k])
        assert_all_close([loss[k], *(g[k] for g in gw)], [single[0], *single[1]], dtype,
                         VMAP_TOL)


# ----------------------------------------------------------------------- (b) vmap over members
def population(backbone, dtype, multi_head, n=3):
    """n members: their own weights, step sizes, data and (class splits) class orders."""
    members = [build(backbone, dtype, multi_head, member=k) for k in range(n)]
    shape, net = members[0][:2]
    data = [member_data(shape, info, dtype, seed=k) for k, (_, _, info, _, _) in
            enumerate(members)]
    masks = [info.class_mask() for _, _, info, _, _ in members] if multi_head else None
    return net, members, data, masks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("every", [True, False], ids=["every", "last"])
@pytest.mark.parametrize("multi_head", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("inner_batches", [None, 2], ids=["samples", "chunks2"])
@pytest.mark.parametrize("second_order", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_vmap_over_members_equals_single_calls(backbone, second_order, inner_batches,
                                               multi_head, every, dtype):
    net, members, data, masks = population(backbone, dtype, multi_head)
    opts = options(inner_batches, second_order, 0.05 if inner_batches else None, every,
                   stack_steps=multi_head)  # both forms of the meta-losses, under vmap
    W = lf.stack([m[3] for m in members])
    A = lf.stack([m[4] for m in members])
    x, y, bx, by, bt = (torch.stack(d) for d in zip(*data))
    mask = torch.stack(masks) if multi_head else None
    loss, gw, ga = lf.vmap_glance(net, W, A, x, y, bx, by, bt, mask, TASK, **opts)
    assert loss.shape == (3,) and all(g.shape[0] == 3 for g in gw + ga)

    for k, (_, _, _, w, a) in enumerate(members):
        single = lf.glance(net, w, a, *data[k], masks[k] if multi_head else None, TASK, **opts)
        assert_all_close([loss[k]], [single[0]], dtype, VMAP_TOL)
        assert_all_close([g[k] for g in gw], single[1], dtype, VMAP_TOL)
        assert_all_close([g[k] for g in ga], single[2], dtype, VMAP_TOL)
    # The members differ: nothing above compared equal numbers by accident.
    assert not torch.allclose(loss[0], loss[1])


def test_vmap_with_a_hand_made_in_dims():
    """The form the population launcher may use: partial(glance, forward, ...) under vmap."""
    from functools import partial

    from torch.func import vmap

    dtype = torch.float64
    net, members, data, masks = population("mlp", dtype, multi_head=True)
    opts = options(None, False, None, True)
    W, A = lf.stack([m[3] for m in members]), lf.stack([m[4] for m in members])
    x, y, bx, by, bt = (torch.stack(d) for d in zip(*data))
    fn = partial(lf.glance, net, **opts)
    loss, gw, ga = vmap(fn, in_dims=(0, 0, 0, 0, 0, 0, 0, 0, None))(
        W, A, x, y, bx, by, bt, torch.stack(masks), TASK)
    ref = lf.vmap_glance(net, W, A, x, y, bx, by, bt, torch.stack(masks), TASK, **opts)
    assert_all_close([loss, *gw, *ga], [ref[0], *ref[1], *ref[2]], dtype)


# ----------------------------------------------------------------------- (c) outer step
VARIANTS = {
    "lamaml": {"learn_lr": True, "sync_update": False},
    "sync": {"learn_lr": True, "sync_update": True},
    "cmaml": {"learn_lr": False, "sync_update": True},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("clip", [0.5, None], ids=["clip", "noclip"])
@pytest.mark.parametrize("per_member", [True, False], ids=["tensor_hp", "float_hp"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_outer_step_equals_lamaml_outer_step(variant, per_member, clip, dtype):
    cfg = VARIANTS[variant]
    opt_lr, opt_wt = [0.3, 0.1, 0.05], [0.1, 0.3, 0.2]
    if not per_member:
        opt_lr, opt_wt = [0.3] * 3, [0.1] * 3
    members = [build("mlp", dtype, multi_head=False, member=k) for k in range(3)]
    g = torch.Generator().manual_seed(5)
    # Gradient sizes that differ per member: clip=0.5 scales member 0 and 2, not member 1.
    scales = [3.0, 0.01, 1.0]
    grads = [(tuple(s * torch.randn(p.shape, generator=g, dtype=dtype) for p in w),
              tuple(s * torch.randn(p.shape, generator=g, dtype=dtype) for p in a))
             for s, (_, _, _, w, a) in zip(scales, members)]

    expected = []
    for k, ((_, net, info, w, a), (gw, ga)) in enumerate(zip(members, grads)):
        m = lamaml_like(net, info, w, a, dtype, opt_lr=opt_lr[k], opt_wt=opt_wt[k],
                        grad_clip_norm=clip, **cfg)
        weights, alphas = list(m.backbone.parameters()), list(m.alpha)
        m.outer_step(weights, alphas, [t.clone() for t in gw], [t.clone() for t in ga])
        expected.append([t.detach().clone() for t in weights + alphas])

    W = lf.stack([m[3] for m in members])
    A = lf.stack([m[4] for m in members])
    GW, GA = lf.stack([gw for gw, _ in grads]), lf.stack([ga for _, ga in grads])
    hp = ((torch.tensor(opt_lr, dtype=dtype), torch.tensor(opt_wt, dtype=dtype)) if per_member
          else (0.3, 0.1))
    lf.outer_step(W, A, GW, GA, opt_lr=hp[0], opt_wt=hp[1], grad_clip_norm=clip, **cfg)
    for k, exp in enumerate(expected):
        got = [t[k] for t in W + A]
        for a_, e in zip(got, exp):  # outer_step's own rounding: tighter than the glance's
            torch.testing.assert_close(a_, e, rtol=1e-12 if dtype == torch.float64 else 1e-6,
                                       atol=1e-12 if dtype == torch.float64 else 1e-6)
    if clip:  # the per-member norms: the small member was left as it was
        norms = [torch.linalg.vector_norm(torch.cat([t[k].flatten() for t in GW]))
                 for k in range(3)]
        torch.testing.assert_close(norms[0], torch.tensor(0.5, dtype=dtype), rtol=1e-5, atol=0)
        assert norms[1] < 0.5


def test_per_member_clip_norm_and_precision():
    """grad_clip_norm as an (N,) tensor clips each member to its own norm; a per-member value
    less precise than the tensors it updates is refused (float32 0.3 != float64 0.3)."""
    g = torch.Generator().manual_seed(0)
    grads = [tuple(torch.randn(3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))]
    G = tuple(torch.stack([t, 2 * t, 3 * t]) for t in grads[0])
    limits = torch.tensor([100.0, 1.0, 2.0], dtype=torch.float64)
    norms = torch.linalg.vector_norm(torch.cat([t.flatten(1) for t in G], 1), dim=1)
    lf.clip_members_(G, limits)
    after = torch.linalg.vector_norm(torch.cat([t.flatten(1) for t in G], 1), dim=1)
    expected = norms * (limits / (norms + 1e-6)).clamp(max=1.0)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=0)
    assert float(after[0]) == pytest.approx(float(norms[0]), rel=1e-12)  # under its limit
    W, A = tuple(t.clone() for t in G), tuple(t.clone() for t in G)
    with pytest.raises(ValueError, match="loses precision"):
        lf.outer_step(W, A, G, G, opt_lr=torch.tensor([0.3, 0.1, 0.2]), opt_wt=0.1,
                      grad_clip_norm=None, learn_lr=True, sync_update=True)


def test_stack_unstack_write_back_round_trip():
    nets = [MLP((1, 2, 3), N_OUT, hidden=(5,)) for _ in range(3)]
    params = [list(n.parameters()) for n in nets]
    W = lf.stack(params)
    assert [t.shape for t in W] == [(3, *p.shape) for p in params[0]]
    for k, member in enumerate(lf.unstack(W)):
        assert all(torch.equal(u, p) for u, p in zip(member, params[k]))
    with torch.no_grad():
        for t in W:
            t.mul_(2.0)
    before = [p.detach().clone() for p in params[1]]
    lf.write_back(W, params)
    assert all(torch.equal(p, 2 * b) for p, b in zip(params[1], before))
    with pytest.raises(ValueError):
        lf.write_back(W, params[:2])
    with pytest.raises(ValueError):
        lf.stack([params[0], params[1][:2]])


@pytest.mark.parametrize("multi_head", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_population_glances_equal_separate_members(variant, multi_head):
    """Three glances of a population with per-member opt_lr / opt_wt: vmap_glance + the stacked
    outer_step leave every member where its own LaMAML's glances (literal loop) leave it."""
    cfg = VARIANTS[variant]
    dtype = torch.float64
    net, members, data, masks = population("mlp", dtype, multi_head)
    opt_lr, opt_wt = [0.3, 0.1, 0.05], [0.1, 0.3, 0.2]
    opts = options(None, False, None, True, need_alpha=cfg["learn_lr"])
    separate = [lamaml_like(n, info, w, a, dtype, opt_lr=opt_lr[k], opt_wt=opt_wt[k],
                            grad_clip_norm=0.5, **method_kwargs(opts), **cfg)
                for k, (_, n, info, w, a) in enumerate(members)]
    W, A = lf.stack([m[3] for m in members]), lf.stack([m[4] for m in members])
    x, y, bx, by, bt = (torch.stack(d) for d in zip(*data))
    mask = torch.stack(masks) if multi_head else None
    for _ in range(3):
        for m, d in zip(separate, data):
            _, gw, ga = m._glance_autograd(*d, True, m.learn_lr, True)
            m.outer_step(list(m.backbone.parameters()), list(m.alpha), gw, ga)
        _, gw, ga = lf.vmap_glance(net, W, A, x, y, bx, by, bt, mask, TASK, **opts)
        lf.outer_step(W, A, gw, ga, opt_lr=torch.tensor(opt_lr, dtype=dtype),
                      opt_wt=torch.tensor(opt_wt, dtype=dtype), grad_clip_norm=0.5, **cfg)
    for k, m in enumerate(separate):
        got = [t[k] for t in W + A]
        assert_all_close(got, [p.detach() for p in list(m.backbone.parameters()) + list(m.alpha)],
                         dtype)
