"""Meta-BGD: the BGD update of means and stds, checked by hand, and evaluation at the means.

The expected update is written from Zeno et al.'s BGD equations and the C-MAML look-ahead loss
with plain autograd on an explicit two-layer network, independently of the method's code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metacl.errors import ConfigError
from metacl.methods.meta_bgd import MetaBGD, bgd_update_
from metacl.models import MLP
from metacl.task_info import TaskInfo

SHAPE = (1, 2, 3)
N_OUT = 4


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make(**kwargs) -> MetaBGD:
    torch.manual_seed(0)
    info = TaskInfo(3, SHAPE, N_OUT, ((0, 1, 2, 3),) * 3, "domain")
    return MetaBGD(MLP(SHAPE, N_OUT, hidden=(5,)), info, **kwargs)


def two_layer(x, p):
    w1, b1, w2, b2 = p
    return F.relu(x.reshape(x.shape[0], -1) @ w1.T + b1) @ w2.T + b2


def batch(n, task=0):
    return torch.randn(n, *SHAPE), torch.randint(N_OUT, (n,)), torch.full((n,), task)


def test_bgd_step_by_hand():
    mean = [torch.tensor([1.0, -2.0, 0.0])]
    std = [torch.tensor([0.1, 0.5, 0.1])]
    e_grad = [torch.tensor([2.0, -1.0, 0.0])]
    e_grad_eps = [torch.tensor([4.0, 0.0, -4.0])]
    bgd_update_(mean, std, e_grad, e_grad_eps, mean_eta=10.0)
    # mu - eta sigma^2 E[g]: 1 - 10 * 0.01 * 2 and -2 - 10 * 0.25 * (-1)
    torch.testing.assert_close(mean[0], torch.tensor([0.8, 0.5, 0.0]))
    # sigma sqrt(1 + (sigma E[g eps] / 2)^2) - sigma^2 E[g eps] / 2 with sigma E[g eps]/2 = +-0.2:
    # a gradient correlated with the noise shrinks sigma, anti-correlated grows it, none keeps it.
    root = math.sqrt(1.04)
    torch.testing.assert_close(std[0], torch.tensor([0.1 * root - 0.02, 0.5, 0.1 * root + 0.02]))


def expected_update(m, x, y, eps_list, *, clip, clamp, eta):
    """One glance of Meta-BGD with one inner step on the whole batch and no replay."""
    mu_w = [p.detach().clone() for p in m.backbone.parameters()]
    mu_a = [a.detach().clone() for a in m.alpha]
    sd_w = [s.clone() for s in m.std]
    sd_a = [s.clone() for s in m.alpha_std]
    n = len(mu_w)
    sums = [torch.zeros_like(v) for v in mu_w + mu_a]
    sums_eps = [torch.zeros_like(v) for v in mu_w + mu_a]
    for eps in eps_list:
        theta = [(mu + sd * e).requires_grad_() for mu, sd, e in zip(mu_w, sd_w, eps[:n])]
        alpha = [(mu + sd * e).requires_grad_() for mu, sd, e in zip(mu_a, sd_a, eps[n:])]
        inner = F.cross_entropy(two_layer(x, theta), y)
        g = torch.autograd.grad(inner, theta, create_graph=True)  # second order
        fast = [p - a * gi.clamp(-clamp, clamp) for p, a, gi in zip(theta, alpha, g)]
        meta = F.cross_entropy(two_layer(x, fast), y)
        grads = torch.autograd.grad(meta, theta + alpha)
        gw, ga = list(grads[:n]), list(grads[n:])
        norm = torch.sqrt(sum((gi**2).sum() for gi in gw))
        gw = [gi * min(1.0, clip / (float(norm) + 1e-6)) for gi in gw]  # weights only
        for i, gi in enumerate(gw + ga):
            sums[i] += x.shape[0] * gi
            sums_eps[i] += x.shape[0] * gi * eps[i]
    k = len(eps_list)
    new_mu, new_sd = [], []
    for mu, sd, s, se in zip(mu_w + mu_a, sd_w + sd_a, sums, sums_eps):
        e_g, e_ge = s / k, se / k
        new_mu.append(mu - eta * sd**2 * e_g)
        new_sd.append(sd * torch.sqrt(1 + (sd * e_ge / 2) ** 2) - sd**2 * e_ge / 2)
    return new_mu[:n], new_mu[n:], new_sd[:n], new_sd[n:]


def test_observe_is_the_hand_computed_bgd_update_of_means_and_stds():
    m = make(glances=1, memories=0, train_mc_iters=2, inner_batches=1, std_init=0.05,
             mean_eta=3.0, alpha_init=0.2, grad_clip_norm=0.5, inner_grad_clamp=0.05)
    x, y, t = batch(4)
    torch.manual_seed(1)
    eps_list = [[torch.randn_like(p) for p in list(m.backbone.parameters()) + list(m.alpha)]
                for _ in range(2)]
    given = iter(eps_list)
    m.sample_noise = lambda like: next(given)
    mu_w, mu_a, sd_w, sd_a = expected_update(m, x, y, eps_list, clip=0.5, clamp=0.05, eta=3.0)
    w0 = [p.detach().clone() for p in m.backbone.parameters()]

    m.observe(x, y, t)

    for got, want in zip(list(m.backbone.parameters()) + list(m.alpha), mu_w + mu_a):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    for got, want in zip(list(m.std) + list(m.alpha_std), sd_w + sd_a):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The update did something: means moved, stds changed away from std_init.
    assert max((p.detach() - q).abs().max() for p, q in zip(m.backbone.parameters(), w0)) > 1e-4
    assert max((s - 0.05).abs().max() for s in m.std) > 1e-6


def test_training_samples_weights_and_evaluation_uses_the_means():
    m = make(glances=2, memories=20, replay_batch_size=3, train_mc_iters=3, std_init=0.1)
    seen = []
    glance = m.glance_gradients

    def recording(*args, **kwargs):  # the weights each Monte-Carlo look-ahead loss is taken at
        seen.append([p.detach().clone() for p in m.backbone.parameters()])
        return glance(*args, **kwargs)

    m.glance_gradients = recording
    x, y, t = batch(6)
    before = [p.detach().clone() for p in m.backbone.parameters()]
    m.observe(x, y, t)
    assert len(seen) == 2 * 3  # glances x Monte-Carlo samples
    # Every sample is mu + sigma * eps, at a distance of order std_init from the mean it was
    # drawn around (the first three around the initial weights), never the mean itself.
    for sample in seen[:3]:
        gap = torch.cat([(s - b).flatten() for s, b in zip(sample, before)])
        assert 0.05 < gap.std() < 0.2
    assert not torch.equal(seen[0][0], seen[1][0])  # a fresh draw for every sample
    # At rest the parameters hold the means, and prediction uses exactly them, deterministically.
    xe = torch.randn(50, *SHAPE)
    params = [p.detach() for p in m.backbone.parameters()]
    expected = two_layer(xe, params).argmax(1)
    assert torch.equal(m.predict(xe, 0), expected)
    assert torch.equal(m.predict(xe, 0), expected)
    # The posterior std does not enter prediction.
    with torch.no_grad():
        for s in m.std:
            s.fill_(10.0)
    assert torch.equal(m.predict(xe, 0), expected)


def test_state_dict_restores_means_stds_and_memory():
    m = make(memories=10, replay_batch_size=2)
    m.observe(*batch(4))
    state = m.state_dict()
    assert {"std.0", "std.3", "alpha_std.0", "alpha.0", "memory.x"} <= set(state)
    fresh = make(memories=10, replay_batch_size=2)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.state_dict().values(), state.values()):
        assert torch.equal(a, b)
    assert not torch.equal(fresh.std[0], torch.full_like(fresh.std[0], 0.02))
    # Buffers follow the module (as .to(device) moves them to a GPU).
    assert fresh.to(torch.float64).std[0].dtype == torch.float64


def test_fixed_step_sizes_without_learn_lr():
    m = make(learn_lr=False, glances=2)
    a0 = [a.detach().clone() for a in m.alpha]
    m.observe(*batch(4))
    assert len(m.alpha_std) == 0
    assert all(torch.equal(a.detach(), b) for a, b in zip(m.alpha, a0))


def test_needs_a_monte_carlo_sample():
    with pytest.raises(ConfigError, match="train_mc_iters"):
        make(train_mc_iters=0)


@pytest.mark.parametrize("cell, memories, epochs, glances, std, eta", [
    ("cifar100_single_pass", 200, 1, 3, 0.02, 50.0),
    ("cifar100_multi_pass", 200, 10, 1, 0.02, 50.0),
    ("tinyimagenet_single_pass", 400, 1, 3, 0.015, 30.0),
    ("tinyimagenet_multi_pass", 400, 10, 1, 0.015, 30.0),
])
def test_experiment_files_hold_the_reference_commands(compose, cell, memories, epochs, glances,
                                                      std, eta):
    cfg = compose([f"experiment=baselines/meta_bgd_{cell}", "paths.output_dir=/tmp/unused"])
    m = cfg.method
    assert m._target_ == "metacl.methods.meta_bgd.MetaBGD" and cfg.model._target_.endswith("PcCNN")
    assert (m.memories, m.n_epochs, m.glances, m.std_init, m.mean_eta) == (
        memories, epochs, glances, std, eta)
    assert (m.train_mc_iters, m.inner_batches, m.alpha_init, m.second_order) == (2, 3, 0.1, True)
    assert cfg.dataset.validation == 0.1 and cfg.dataset.scenario.class_order == "random"
    assert cfg.model.init == "xavier_normal"  # the commands' --xav_init


def _first_cifar_batch_loss(init: str) -> float:
    """The look-ahead loss of the reference's CIFAR-100 single-pass Meta-BGD on one batch of
    CIFAR-shaped inputs (uniform pixels, normalised as the datamodule does), per `model.init`."""
    from metacl.models import PcCNN

    torch.manual_seed(0)
    info = TaskInfo(20, (3, 32, 32), 100, tuple(tuple(range(5 * t, 5 * t + 5))
                                               for t in range(20)), "class")
    m = MetaBGD(PcCNN((3, 32, 32), 100, init=init), info, glances=3, memories=200,
                replay_batch_size=10, alpha_init=0.1, std_init=0.02, mean_eta=50.0,
                train_mc_iters=2, inner_batches=3, vectorize=False)
    x = (torch.rand(10, 3, 32, 32) - 0.5) / 0.27
    y, t = torch.randint(5, (10,)), torch.zeros(10, dtype=torch.long)
    loss = float(m.observe(x, y, t))
    finite = all(torch.isfinite(p).all() for p in [*m.parameters(), *m.buffers()]
                 if p.is_floating_point())
    return loss if finite else math.inf


def test_reference_initialisation_keeps_the_first_cifar_batch_finite():
    # Issue 17: the Meta-BGD files diverged at batch 1. The reference's commands pass --xav_init;
    # with kaiming weights the inner step of 0.1 multiplies the look-ahead loss, the (unclipped)
    # step-size gradients reach 1e3-1e5, BGD moves the step sizes by hundreds and the third
    # glance is NaN. With Xavier weights the loss stays near log(5).
    assert _first_cifar_batch_loss("xavier_normal") < 3.0
    assert _first_cifar_batch_loss("kaiming_normal") > 100.0


def _stream_run(compile: bool, multi_head: bool, learn_lr: bool, dtype=torch.float32,
                device="cpu"):
    torch.manual_seed(0)
    info = (TaskInfo(2, SHAPE, N_OUT, ((0, 1), (2, 3)), "class") if multi_head
            else TaskInfo(2, SHAPE, N_OUT, ((0, 1, 2, 3),) * 2, "domain"))
    m = MetaBGD(MLP(SHAPE, N_OUT, hidden=(5,)).to(dtype), info, batch_size=4, glances=2,
                memories=5, replay_batch_size=3, inner_batches=2, learn_lr=learn_lr,
                compile=compile).to(device=device, dtype=dtype)
    if compile and device == "cpu":
        m._mc_program.backend = "aot_eager"  # the same fullgraph trace, no C++ generated
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(7)  # shuffles, replay draws, noise: one stream for both paths
    losses = []
    for task, sizes in ((0, (4, 4, 4)), (1, (4, 4, 3))):  # a task switch, a short last batch
        m.before_task(task, None)
        for n in sizes:
            x = torch.randn(n, *SHAPE, generator=g, dtype=dtype)
            y = torch.tensor(info.task_classes[task])[
                torch.randint(0, len(info.task_classes[task]), (n,), generator=g)]
            x, y = x.to(device), y.to(device)
            losses.append(m.observe(x, y, torch.full((n,), task, device=device)))
    state = [t.detach().clone() for t in [*m.backbone.parameters(), *m.alpha, *m.std,
                                          *m.alpha_std]]
    return m, state, torch.stack(losses), m.memory.x.clone()


@pytest.mark.parametrize("multi_head", [False, True])
@pytest.mark.parametrize("learn_lr", [False, True])
def test_compiled_monte_carlo_gradients_equal_the_eager_path(multi_head, learn_lr):
    """method.compile=true: each Monte-Carlo sample's gradients as one compiled program give
    the eager update of means, stds and step sizes over a task switch, a full memory and a
    shorter last batch (which runs the same function uncompiled)."""
    m, got, losses, memory = _stream_run(True, multi_head, learn_lr)
    assert m._mc_program.compiled_calls > 0 and m._mc_program.eager_calls > 0
    _, want, want_losses, want_memory = _stream_run(False, multi_head, learn_lr)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(memory, want_memory)
    assert max(float((a - b).abs().max()) for a, b in zip(got, _stream_run(
        False, multi_head, learn_lr)[1])) == 0  # the eager path is deterministic
    torch.manual_seed(0)
    initial = [p.detach() for p in MLP(SHAPE, N_OUT, hidden=(5,)).parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(got, initial)) > 1e-3  # it trained


def test_compile_is_refused_for_a_changed_update_and_allows_32_bit_only():
    class OwnObserve(MetaBGD):
        def observe(self, x, y, t):
            return super().observe(x, y, t)

    with pytest.raises(ConfigError, match="OwnObserve changes Meta-BGD's loss or update"):
        OwnObserve(MLP(SHAPE, N_OUT), TaskInfo(3, SHAPE, N_OUT, ((0, 1, 2, 3),) * 3, "domain"),
                   compile=True)
    assert MetaBGD.precisions_for({"compile": True})[0] == ("32-true",)
    assert make()._mc_program is None
