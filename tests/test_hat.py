"""HAT: gates, s annealing, regulariser, compensation, masked updates, state, gated backbones."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metacl.errors import ConfigError
from metacl.methods.finetune import Finetune
from metacl.methods.hat import HAT, anneal_s, attention_regulariser, embedding_compensation
from metacl.models import MLP, PcCNN
from metacl.models.alexnet import AlexNet
from metacl.task_info import TaskInfo

SHAPE = (1, 6, 6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def domain_info(n_tasks=2, n_out=3):
    return TaskInfo(n_tasks, SHAPE, n_out, tuple(tuple(range(n_out)) for _ in range(n_tasks)),
                    "domain")


def detached(method):
    """Let observe() run without a Trainer: plain optimizer, plain backward."""
    method.optimizers = lambda: method.optimizer
    method.manual_backward = lambda loss: loss.backward()
    return method


def hat(hidden=(16, 16), info=None, **kwargs):
    info = info or domain_info()
    return detached(HAT(MLP(SHAPE, info.n_outputs, hidden=hidden), info, **kwargs))


def task_data(t: int, n: int = 60):
    """Task t: 3 classes, each a fixed random pattern of the task plus noise."""
    gen = torch.Generator().manual_seed(100 + t)
    patterns = torch.randn(3, *SHAPE, generator=gen)
    y = torch.arange(3).repeat(n // 3)
    return patterns[y] + 0.3 * torch.randn(n, *SHAPE, generator=gen), y


def train_task(method, t: int, epochs: int = 6, batches: int = 4):
    method.before_task(t, None)
    x, y = task_data(t)
    for _ in range(epochs):
        for b, (bx, by) in enumerate(zip(x.chunk(batches), y.chunk(batches))):
            method._progress = b / batches
            method.observe(bx, by, torch.full_like(by, t))
    method.after_task(t, None)


# ----------------------------------------------------------------------------- pieces
def test_gates_lie_in_0_1_and_become_binary_as_s_reaches_smax():
    method = hat()
    e = torch.tensor([-6.0, -0.5, -0.05, 0.05, 0.5, 6.0])
    method.embeddings[0].data[0, :6] = e
    soft = method.gates(0, 1 / 400)[0][:6]
    hard = method.gates(0, 400.0)[0][:6]
    mid = method.gates(0, 1.0)[0][:6]
    assert ((soft > 0) & (soft < 1)).all() and ((mid > 0) & (mid < 1)).all()
    assert ((hard >= 0) & (hard <= 1)).all()  # float32 saturates sigmoid(+-2400) to 0 and 1
    assert (soft - 0.5).abs().max() < 0.01  # s = 1/smax: every gate half open
    assert torch.minimum(hard, 1 - hard).max() < 3e-9  # s = smax: 0 or 1 up to sigmoid(-20)
    assert torch.equal(hard > 0.5, e > 0)


def test_s_anneals_from_one_over_smax_to_smax_within_an_epoch():
    assert anneal_s(0.0, 400) == pytest.approx(1 / 400)
    assert anneal_s(1.0, 400) == pytest.approx(400)
    assert anneal_s(0.5, 400) == pytest.approx((400 + 1 / 400) / 2)
    # observe uses the batch's place in the epoch: the first batch trains at s = 1/smax
    method = hat()
    seen = []
    method.task_logits = lambda x, t, s: (seen.append(s), HAT.task_logits(method, x, t, s))[1]
    method.before_task(0, None)
    x, y = task_data(0, 6)
    for progress in (0.0, 0.75):
        method._progress = progress
        method.observe(x, y, torch.zeros_like(y))
    assert seen == [pytest.approx(1 / 400), pytest.approx(anneal_s(0.75, 400))]


def test_regulariser_on_hand_made_masks():
    gates = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.5, 0.5])]
    cumulative = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0])]
    # numerator: 1*0 + 0*1 + 1*1 + 0.5*1 + 0.5*0 = 1.5; denominator: 0 + 1 + 1 + 1 + 0 = 3
    assert float(attention_regulariser(gates, cumulative)) == pytest.approx(0.5)
    # the first task: the mean of every gate
    assert float(attention_regulariser(gates, None)) == pytest.approx(3.0 / 5)
    # a_t inside a_<t costs nothing
    inside = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0])]
    assert float(attention_regulariser(inside, cumulative)) == 0.0


def test_embedding_gradient_compensation_matches_the_formula():
    e = torch.tensor([0.5, -1.0, 1.0])
    got = embedding_compensation(e, s=2.0, smax=400.0)
    expected = [400 / 2 * (math.cosh(2 * v) + 1) / (math.cosh(v) + 1) for v in (0.5, -1.0, 1.0)]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # s*e beyond +-50 is clamped inside the cosh
    big = embedding_compensation(torch.tensor([1.0]), s=100.0, smax=400.0, cosh_clamp=50.0)
    assert float(big) == pytest.approx(4 * (math.cosh(50) + 1) / (math.cosh(1) + 1), rel=1e-5)


# ----------------------------------------------------------------------------- masked updates
def _claim_half(method):
    """Pretend an earlier task used the first half of every layer's units."""
    for c in method.cumulative:
        c.zero_()
        c[: len(c) // 2] = 1.0
    method._n_masked = 1
    method.n_masked.fill_(1)


def test_sgd_update_is_lr_times_the_conditioned_gradient():
    method = hat(lr=0.1)
    _claim_half(method)
    method.before_task(1, None)
    w0, _, w1, _ = [p.detach().clone() for p in method.feature_params]
    x, y = task_data(1, 12)
    method._progress = 0.5
    method.observe(x, y, torch.ones_like(y))
    (p0, _, p1, _) = method.feature_params
    c0, c1 = method.cumulative
    factor1 = 1 - torch.minimum(c1[:, None], c0[None, :])
    assert torch.allclose(p1.detach() - w1, -0.1 * factor1 * p1.grad, atol=1e-7)
    assert torch.allclose(p0.detach() - w0, -0.1 * (1 - c0)[:, None] * p0.grad, atol=1e-7)
    assert (p1.grad[:8, :8] != 0).any()  # the gradient is there; only the update is masked


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.01)])
def test_weights_between_units_claimed_by_earlier_tasks_never_move(momentum, weight_decay):
    method = hat(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    _claim_half(method)
    before = [p.detach().clone() for p in method.feature_params]
    heads_before = method.head_weight.detach().clone()
    emb_before = method.embeddings[0].detach().clone()
    method.before_task(1, None)
    x, y = task_data(1, 12)
    for step in range(5):
        method._progress = step / 5
        method.observe(x, y, torch.ones_like(y))
    w0, b0, w1, b1 = [p.detach() for p in method.feature_params]
    assert torch.equal(w0[:8], before[0][:8]) and torch.equal(b0[:8], before[1][:8])
    assert torch.equal(w1[:8, :8], before[2][:8, :8]) and torch.equal(b1[:8], before[3][:8])
    assert not torch.equal(w1[8:], before[2][8:])  # free units learn
    # 1 - min(a_in, a_out): a weight reading a unit no earlier task uses may move even into a
    # claimed unit (earlier tasks gate that input to 0, so they never see the change)
    assert not torch.equal(w1[:8, 8:], before[2][:8, 8:])
    assert torch.equal(method.head_weight[0], heads_before[0])  # other tasks' heads
    assert torch.equal(method.embeddings[0][0], emb_before[0])  # and embeddings stay
    assert not torch.equal(method.head_weight[1], heads_before[1])
    assert method.embeddings[0].abs().max() <= 6.0


def test_training_a_second_task_keeps_the_first_tasks_outputs_and_sgd_does_not():
    x0, _ = task_data(0)
    method = hat(hidden=(32, 32), lr=0.1, smax=400.0)
    train_task(method, 0)
    method.eval()
    with torch.no_grad():
        before = method(x0, 0).clone()
    method.train()
    train_task(method, 1)
    method.eval()
    with torch.no_grad():
        after = method(x0, 0)
    hat_change = (after - before).abs().max()

    info = domain_info()
    sgd = detached(Finetune(MLP(SHAPE, 3, hidden=(32, 32)), info, lr=0.1))
    for t in range(2):
        x, y = task_data(t)
        if t == 1:
            with torch.no_grad():
                sgd_before = sgd.backbone(x0).clone()
        for _ in range(6):
            for bx, by in zip(x.chunk(4), y.chunk(4)):
                sgd.observe(bx, by, torch.full_like(by, t))
    with torch.no_grad():
        sgd_change = (sgd.backbone(x0) - sgd_before).abs().max()
    assert hat_change < 1e-4 * before.abs().max()
    assert sgd_change > 0.1 * sgd_before.abs().max()


def test_after_task_accumulates_masks_reports_usage_and_state_restores():
    method = hat(hidden=(8, 8))
    train_task(method, 0, epochs=1)
    first = [c.clone() for c in method.cumulative]
    assert all(torch.equal(c, g) for c, g in zip(first, method.gates(0, 400.0)))
    train_task(method, 1, epochs=1)
    for c, f, g in zip(method.cumulative, first, method.gates(1, 400.0)):
        assert torch.equal(c, torch.maximum(f, g))
    stats = method.task_metrics()
    for layer, c in enumerate(method.cumulative):
        assert stats[f"hat/used_layer{layer}"] == float((c > 0.5).float().mean())
    assert stats["hat/used_all"] == pytest.approx(
        sum(float((c > 0.5).sum()) for c in method.cumulative) / 16)

    fresh = hat(hidden=(8, 8))
    fresh.load_state_dict(method.state_dict())
    assert fresh._n_masked == 2
    x, _ = task_data(0, 9)
    method.eval(), fresh.eval()
    for t in range(2):
        assert torch.equal(fresh.predict(x, t), method.predict(x, t))


def test_hat_refuses_an_ungated_model_in_one_line():
    info = TaskInfo(2, (3, 16, 16), 4, ((0, 1), (2, 3)), "class")
    with pytest.raises(ConfigError,
                       match=r"needs a gated model, not PcCNN; allowed: model=alexnet, mlp, mlp_hat$"):
        HAT(PcCNN((3, 16, 16), 4, channels=4, hidden=6), info)


def test_class_split_heads_are_masked_to_the_task_classes():
    info = TaskInfo(2, SHAPE, 4, ((0, 1), (2, 3)), "class")
    method = hat(info=info)
    x, _ = task_data(0, 9)
    assert set(method.predict(x, 1).tolist()) <= {2, 3}
    assert set(method.predict(x, 0).tolist()) <= {0, 1}


# ----------------------------------------------------------------------------- gated backbones
def test_alexnet_shapes_follow_the_reference():
    net = AlexNet((3, 32, 32), 10)
    assert net.kernels == (4, 3, 2) and net.spatial == 2 and net.gate_sizes == (64, 128, 256,
                                                                               2048, 2048)
    assert net.params[6].shape == (2048, 256 * 2 * 2)
    assert AlexNet((1, 28, 28), 10).kernels == (3, 2, 2)


@pytest.mark.parametrize("make", [lambda: MLP(SHAPE, 3, hidden=(5, 7)),
                                  lambda: AlexNet((3, 16, 16), 3, channels=(4, 5, 6), hidden=8)])
def test_gate_param_masks_follow_the_wiring(make):
    """A weight's mask is 0 exactly where a zero gate cuts it: when a unit's gate is 0, no
    gradient reaches the weights writing into it, nor those reading from it."""
    net = make().eval()
    for layer, units in enumerate(net.gate_sizes):
        gates = [torch.ones(n) for n in net.gate_sizes]
        gates[layer][0] = 0.0
        masks = net.gate_param_masks(gates)
        x = torch.randn(32, *net.input_shape)
        net.zero_grad()
        net.head(net.features(x, gates=gates)).pow(2).sum().backward()
        for p, m in zip(net.parameters(), masks):
            if m is None:
                continue
            assert m.shape == p.shape
            assert (p.grad[m == 0] == 0).all()
            # where the mask is 1 some gradient flows (ReLUs may zero a few entries)
            assert (p.grad[m == 1] != 0).any()


def test_mlp_dropout_only_in_training():
    net = MLP(SHAPE, 3, hidden=(50,), input_dropout=0.2, dropout=0.5)
    x = torch.randn(8, *SHAPE)
    assert torch.equal(net.eval()(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))
    with pytest.raises(ConfigError, match="model.dropout=1.5"):
        MLP(SHAPE, 3, dropout=1.5)


def test_loss_of_hat_includes_the_regulariser_in_validation():
    method = hat().eval()
    x, y = task_data(0, 9)
    with torch.no_grad():
        logits, gates = method.task_logits(x, 0, 400.0)
        expected = F.cross_entropy(logits, y) + 0.75 * attention_regulariser(gates, None)
        assert float(method.validation_loss(x, y, 0)) == pytest.approx(float(expected))
