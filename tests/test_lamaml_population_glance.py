"""The member-batched La-MAML MLP glance (`MLPGlance(members=N)`) against N separate glances.

A population run trains N members (seeds, hyperparameters) as one program; its glance must give
every member what that member's own single-run glance gives. The single-member glance is
itself checked against autograd in tests/test_lamaml.py, so here each member of a batched
glance is compared with a one-member glance on that member's weights, step sizes, batches and
masks: float32 within 1e-5 and float64 within 1e-10 of the gradient's norm.
"""

from __future__ import annotations

import pytest
import torch

from metacl.methods.base import MASK_VALUE
from metacl.methods.lamaml_mlp import MLPGlance
from metacl.models import MLP

SHAPE = (1, 4, 5)  # 20 input features
D, N_OUT, K = 20, 4, 4
MEMBERS = 3
# Input columns that are zero in every member's incoming samples, except columns 3 and 5
# (nonzero in member 1 only) and 0 (member 2 only). Every glance skips its member's own zero
# columns; the batched glance keeps 10 per member, so member 0 pads its 8 nonzero columns with
# its zero columns 0 and 1 (column 0 is member 2's) and member 2 pads its 9 with column 1.
ZERO_COLS = list(range(12))
OWN_COLS = {1: [3, 5], 2: [0]}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def member_inputs(gen, dtype, incoming_in_meta, multi_head):
    """One member's (x, y, bx, by, mask_inner, mask_meta), with its own task and classes."""
    task = int(torch.randint(2, (1,), generator=gen))
    own = torch.tensor([0, 1]) + 2 * task  # the member's current task's classes
    x = torch.randn(K, *SHAPE, generator=gen, dtype=dtype)
    x.view(K, -1)[:, ZERO_COLS] = 0.0
    y = own[torch.randint(2, (K,), generator=gen)]
    mem_rows = 3 if incoming_in_meta else 5
    mx = torch.randn(mem_rows, *SHAPE, generator=gen, dtype=dtype)  # nonzero everywhere
    mt = torch.randint(2, (mem_rows,), generator=gen)
    my = 2 * mt + torch.randint(2, (mem_rows,), generator=gen)
    if incoming_in_meta:  # memory rows then the incoming samples, as observe builds it
        bx, by, bt = torch.cat([mx, x]), torch.cat([my, y]), torch.cat([mt, torch.full((K,),
                                                                                   task)])
    else:
        bx, by, bt = mx, my, mt
    mask_inner = mask_meta = None
    if multi_head:  # additive masks: 0 on the task's classes, MASK_VALUE elsewhere
        allowed = torch.arange(N_OUT) // 2
        mask_inner = torch.where(allowed == task, 0.0, MASK_VALUE).to(dtype)
        mask_meta = torch.where(allowed[None] == bt[:, None], 0.0, MASK_VALUE).to(dtype)
    return x, y, bx, by, mask_inner, mask_meta


def population_inputs(gen, dtype, incoming_in_meta, multi_head):
    members = [member_inputs(gen, dtype, incoming_in_meta, multi_head) for _ in range(MEMBERS)]
    for member, cols in OWN_COLS.items():
        members[member][0].view(K, -1)[1, cols] = 0.7
    stacked = [None if parts[0] is None else torch.stack(parts) for parts in zip(*members)]
    return members, stacked


def fill_member(glance: MLPGlance, row: int, gen, dtype):
    """Member-specific weights and step sizes, some of them negative (relu')."""
    glance.w[row] = 0.5 * torch.randn(glance.size, generator=gen, dtype=dtype)
    glance.a[row] = 0.05 + 0.2 * torch.rand(glance.size, generator=gen, dtype=dtype)
    negative = torch.rand(glance.size, generator=gen) < 0.1
    glance.a[row][negative] = -0.05


def assert_rows_close(batched: torch.Tensor, single: torch.Tensor, dtype):
    scale = float(torch.linalg.vector_norm(single))
    assert scale > 0
    assert float((batched - single).abs().max()) <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("need", ["w", "alpha", "both"])
@pytest.mark.parametrize("relu_lr", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("incoming_in_meta", [True, False], ids=["tail", "separate"])
@pytest.mark.parametrize("multi_head", [False, True], ids=["single_head", "multi_head"])
def test_batched_glance_equals_separate_glances(dtype, need, relu_lr, incoming_in_meta,
                                                multi_head):
    torch.manual_seed(0)
    mlp = MLP(SHAPE, N_OUT, hidden=(6, 5)).to(dtype)  # three layers: the hidden-layer loop too
    like = next(mlp.parameters())
    need_w, need_alpha = need in ("w", "both"), need in ("alpha", "both")
    gen = torch.Generator().manual_seed(1)
    batched = MLPGlance(mlp, K, like, members=MEMBERS)
    singles = [MLPGlance(mlp, K, like) for _ in range(MEMBERS)]
    for row, single in enumerate(singles):
        fill_member(batched, row, gen, dtype)
        single.w[0], single.a[0] = batched.w[row], batched.a[row]

    # A first glance on other data: the second one must not see anything it left behind.
    _, warm = population_inputs(gen, dtype, incoming_in_meta, multi_head)
    batched.glance(*warm, True, True, relu_lr, incoming_in_meta)
    members, stacked = population_inputs(gen, dtype, incoming_in_meta, multi_head)
    kept = stacked[0].reshape(MEMBERS, -1, D).ne(0).any(1).sum(1).tolist()
    assert kept == [8, 10, 9] and max(kept) <= 0.8 * D  # the skip is taken, columns differ
    batched.gw.zero_(), batched.ga.zero_()
    loss = batched.glance(*stacked, need_w, need_alpha, relu_lr, incoming_in_meta)

    assert loss.shape == (MEMBERS,)
    for row, (single, inputs) in enumerate(zip(singles, members)):
        one = [None if v is None else v.unsqueeze(0) for v in inputs]
        single_loss = single.glance(*one, need_w, need_alpha, relu_lr, incoming_in_meta)
        torch.testing.assert_close(loss[row], single_loss[0], rtol=TOL[dtype], atol=0.0)
        if need_w:
            assert_rows_close(batched.gw[row], single.gw[0], dtype)
        if need_alpha:
            assert_rows_close(batched.ga[row], single.ga[0], dtype)
    # members really differ (a mix-up of rows would not go unnoticed)
    out = batched.gw if need_w else batched.ga
    assert float((out[0] - out[2]).abs().max()) > 1e-3 * float(out[0].norm())


def test_one_member_views_are_a_single_runs():
    """A one-member glance keeps a single run's interface: member 0's parameter views."""
    mlp = MLP(SHAPE, N_OUT, hidden=(6,))
    glance = MLPGlance(mlp, K, next(mlp.parameters()))
    assert glance.w.shape == glance.ga.shape == (1, glance.size)
    params = list(mlp.parameters())
    with torch.no_grad():
        torch._foreach_copy_(glance.w_views, params)
    for view, p in zip(glance.views(glance.w[0]), params):
        assert torch.equal(view, p)
    with pytest.raises(ValueError, match="members"):
        MLPGlance(mlp, K, next(mlp.parameters()), members=0)
