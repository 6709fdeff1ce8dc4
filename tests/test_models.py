"""Tests for the functional backbones (fast weights, vmap, second-order gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from metacl.errors import ConfigError
from metacl.models import MLP, Backbone, PcCNN, ResNet18
from metacl.models.alexnet import AlexNet
from metacl.models.conv4 import Conv4

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
TINY = (3, 64, 64)

# name -> (constructor, input shape); tests use tiny batches to keep CPU time low.
CASES = {
    "mlp-mnist": (lambda: MLP(MNIST, 10), MNIST),
    "pc_cnn-cifar": (lambda: PcCNN(CIFAR, 100), CIFAR),
    "pc_cnn-tiny": (lambda: PcCNN(TINY, 200), TINY),
    "resnet18-cifar": (lambda: ResNet18(CIFAR, 100), CIFAR),
    "resnet18-mnist": (lambda: ResNet18(MNIST, 10), MNIST),
    "resnet18-tiny": (lambda: ResNet18(TINY, 200), TINY),
}

# Models whose forward is vmap-able over parameter sets (ResNet only without running stats).
VMAP_CASES = {
    "mlp": (lambda: MLP(MNIST, 10), MNIST),
    "pc_cnn": (lambda: PcCNN(CIFAR, 10), CIFAR),
    "resnet18-no-stats": (
        lambda: ResNet18(CIFAR, 10, nf=8, track_running_stats=False),
        CIFAR,
    ),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These tensors are tiny: on a small shared CPU, extra intra-op threads mostly spin-wait
    # and roughly double CPU time. Restore the setting so other test modules are unaffected.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _perturbed(model: nn.Module, scale: float = 0.05) -> list[torch.Tensor]:
    """A detached copy of the parameters with small noise, as plain leaf tensors."""
    return [(p.detach() + scale * torch.randn_like(p)).requires_grad_() for p in model.parameters()]


@pytest.mark.parametrize("case", CASES)
def test_output_shape(case):
    make, shape = CASES[case]
    model = make()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, model.n_outputs)
    assert torch.isfinite(out).all()


def test_flattened_input_is_accepted():
    x = torch.randn(2, *CIFAR)
    for model in (MLP(CIFAR, 5), PcCNN(CIFAR, 5), ResNet18(CIFAR, 5).eval()):
        torch.testing.assert_close(model(x.reshape(2, -1)), model(x))


def test_mlp_parameter_count_is_lamaml_mnist_net():
    model = MLP(MNIST, 10)
    expected = 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert sum(p.numel() for p in model.parameters()) == expected == 89_610
    assert [tuple(p.shape) for p in model.parameters()] == [
        (100, 784),
        (100,),
        (100, 100),
        (100,),
        (10, 100),
        (10,),
    ]


def test_mlp_uses_default_linear_init():
    # nn.Linear's default init bounds every weight by 1/sqrt(fan_in) (kaiming-uniform a=sqrt 5)
    # and every bias by 1/sqrt(fan_in); biases are non-zero.
    w, b = list(MLP(MNIST, 10).parameters())[:2]
    bound = 1 / 784**0.5
    assert w.abs().max() <= bound and b.abs().max() <= bound and b.abs().sum() > 0


def test_pc_cnn_defaults_follow_input_size():
    cifar, tiny = PcCNN(CIFAR, 100), PcCNN(TINY, 200)
    assert (cifar.n_conv, cifar.hidden, cifar.flat_features) == (3, 320, 160 * 4 * 4)
    assert (tiny.n_conv, tiny.hidden, tiny.flat_features) == (4, 640, 160 * 4 * 4)
    # conv: 3*160*9+160 + 2*(160*160*9+160); head: 2560*320+320 + 320*320+320 + 320*100+100
    assert sum(p.numel() for p in cifar.parameters()) == 1_419_940
    custom = PcCNN(CIFAR, 10, channels=8, n_conv=2, hidden=16)
    assert custom.flat_features == 8 * 8 * 8
    assert custom(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_pc_cnn_initialisations():
    # kaiming_normal (default): weight std sqrt(2 / fan_in), zero biases. xavier_normal (La-MAML's
    # --xav_init): std sqrt(2 / (fan_in + fan_out)), conv biases std sqrt(2 / (1 + 9 C)), zero
    # linear biases. Checked on the two layers where they differ most: the first conv, the head.
    torch.manual_seed(0)
    kaiming, xavier = PcCNN(CIFAR, 100), PcCNN(CIFAR, 100, init="xavier_normal")
    (kw, kb), (xw, xb) = [list(m.parameters())[:2] for m in (kaiming, xavier)]
    fan_in, fan_out = 3 * 9, 160 * 9
    assert abs(kw.std() / (2 / fan_in) ** 0.5 - 1) < 0.1 and not kb.any()
    assert abs(xw.std() / (2 / (fan_in + fan_out)) ** 0.5 - 1) < 0.1
    assert abs(xb.std() / (2 / (1 + 9 * 160)) ** 0.5 - 1) < 0.3 and xb.abs().sum() > 0
    head_w, head_b = list(xavier.parameters())[-2:]
    assert abs(head_w.std() / (2 / (320 + 100)) ** 0.5 - 1) < 0.1 and not head_b.any()
    with pytest.raises(ConfigError, match="model.init=he.*kaiming_normal, xavier_normal"):
        PcCNN(CIFAR, 10, init="he")


def test_resnet18_layout():
    model = ResNet18(CIFAR, 100)
    # 1 stem conv + 8 blocks * 2 convs + 3 shortcut convs = 20 conv+BN units (3 params each).
    assert len(list(model.parameters())) == 20 * 3 + 2
    assert model.flat_features == 8 * 20  # 32 -> 4x4 after three stride-2 stages -> pool 4
    assert ResNet18(TINY, 200).flat_features == 8 * 20 * 2 * 2
    assert len(list(model.buffers())) == 2 * 20
    assert len(list(ResNet18(CIFAR, 10, track_running_stats=False).buffers())) == 0


def test_model_configs_name_the_backbones():
    """Hydra's _target_ is the registry: every conf/model option builds its backbone class."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metacl.models.backbones import gated_backbones

    from .conftest import CONF

    classes = {}
    for path in sorted((CONF / "model").glob("*.yaml")):
        model = instantiate(OmegaConf.load(path), input_shape=CIFAR, n_outputs=7)
        assert isinstance(model, Backbone) and model(torch.zeros(2, *CIFAR)).shape == (2, 7)
        classes[path.stem] = type(model)
    assert classes == {"alexnet": AlexNet, "conv4": Conv4, "mlp": MLP, "mlp_hat": MLP,
                       "pc_cnn": PcCNN, "resnet18": ResNet18}
    assert gated_backbones() == ["alexnet", "mlp", "mlp_hat"]  # HAT's allowed models
    with pytest.raises(TypeError):
        MLP(MNIST, 10, not_a_hparam=1)


def test_backbones_import_no_model_built_on_them():
    """No import circle: backbones.py defines the base class and imports neither alexnet.py
    nor conv4.py, which build on it."""
    import subprocess
    import sys

    code = ("import sys, metacl.models.backbones; "
            "print(sorted(m for m in sys.modules if m.startswith('metacl.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "alexnet" not in out and "conv4" not in out and "metacl.models.backbones" in out


@pytest.mark.parametrize("case", CASES)
def test_all_parameters_live_in_the_flat_list(case):
    model = CASES[case][0]()
    own = {id(p) for p in model.params}
    assert [id(p) for p in model.parameters()] == [id(p) for p in model.params]
    assert len(own) == len(list(model.parameters()))


@pytest.mark.parametrize("case", CASES)
def test_explicit_params_match_own_params(case):
    make, shape = CASES[case]
    model = make().eval()  # eval: BN uses (fixed) running stats, so both calls see the same
    x = torch.randn(2, *shape)
    torch.testing.assert_close(model(x, params=list(model.parameters())), model(x))


@pytest.mark.parametrize("case", ["mlp-mnist", "pc_cnn-cifar", "resnet18-cifar"])
def test_perturbed_params_change_output_and_receive_gradients(case):
    make, shape = CASES[case]
    model = make()
    x, y = torch.randn(4, *shape), torch.randint(0, model.n_outputs, (4,))
    fast = _perturbed(model)
    out = model(x, params=fast)
    assert not torch.allclose(out, model(x))
    grads = torch.autograd.grad(F.cross_entropy(out, y), fast)
    assert len(grads) == len(fast)
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, fast))
    assert all(g.abs().sum() > 0 for g in grads)
    # The module's own parameters are untouched by a fast-weight forward/backward.
    assert all(p.grad is None for p in model.parameters())


def test_wrong_number_of_params_is_rejected():
    model = MLP(MNIST, 10)
    with pytest.raises(ValueError):
        model(torch.randn(2, *MNIST), params=list(model.parameters())[:-1])


@pytest.mark.parametrize("case", VMAP_CASES)
def test_vmap_over_stacked_params_matches_separate_calls(case):
    make, shape = VMAP_CASES[case]
    model = make()
    x = torch.randn(3, *shape)
    sets = [[t.detach() for t in _perturbed(model)] for _ in range(3)]
    stacked = [torch.stack(group) for group in zip(*sets)]

    batched = vmap(lambda ps: model(x, params=ps))(stacked)
    separate = torch.stack([model(x, params=ps) for ps in sets])
    assert batched.shape == (3, 3, model.n_outputs)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)


def test_resnet18_running_stats():
    model = ResNet18(CIFAR, 10)
    x = torch.randn(4, *CIFAR) * 2 + 1
    before = model.bn0_mean.clone()
    model.train()
    model(x, params=_perturbed(model))  # fast weights still update the running statistics
    assert not torch.equal(model.bn0_mean, before)

    model.eval()
    frozen = [b.clone() for b in model.buffers()]
    # Eval mode normalises with running stats: a sample's logits don't depend on its batch.
    torch.testing.assert_close(model(x)[:1], model(x[:1]))
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.buffers()))


def _meta_grads(model: Backbone, x, y, second_order: bool) -> list[torch.Tensor]:
    """Gradient w.r.t. w of L(w - 0.1 * dL/dw) (one MAML-style inner step)."""
    w = list(model.parameters())
    inner = torch.autograd.grad(
        F.cross_entropy(model(x, params=w), y), w, create_graph=second_order
    )
    fast = [p - 0.1 * g for p, g in zip(w, inner)]
    return list(torch.autograd.grad(F.cross_entropy(model(x, params=fast), y), w))


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP(MNIST, 10, hidden=(32,)),
        lambda: PcCNN(CIFAR, 10, channels=8, hidden=16),
        lambda: ResNet18(CIFAR, 10, nf=4),
    ],
    ids=["mlp", "pc_cnn", "resnet18"],
)
def test_second_order_gradients(make):
    model = make()
    shape = model.input_shape
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    second = _meta_grads(model, x, y, second_order=True)
    first = _meta_grads(model, x, y, second_order=False)
    assert all(torch.isfinite(g).all() for g in second)
    # The Hessian-vector term makes second-order meta-gradients differ from first-order ones.
    diff = sum((a - b).abs().sum() for a, b in zip(second, first))
    assert diff > 1e-6


def test_mlp_init_options():
    torch.manual_seed(0)
    kaiming = MLP(MNIST, 10, init="kaiming_normal")
    assert all(torch.equal(b, torch.zeros_like(b)) for b in list(kaiming.parameters())[1::2])
    # kaiming-normal (fan_in, gain sqrt(2)): std of the first layer ~ sqrt(2 / 784)
    assert abs(kaiming.params[0].std().item() - (2 / 784) ** 0.5) < 0.005
    default = MLP(MNIST, 10)
    assert not torch.equal(default.params[1], torch.zeros_like(default.params[1]))
    with pytest.raises(ConfigError, match="model.init=xavier"):
        MLP(MNIST, 10, init="xavier")


@pytest.mark.parametrize("hidden", [[], [5], [6, 4]])
@pytest.mark.parametrize("masked", [False, True])
def test_mlp_grad_matches_autograd(hidden, masked):
    """metacl.models.mlp_grad: hand-written loss and gradient equal autograd's."""
    from metacl.methods.base import MASK_VALUE
    from metacl.models.mlp_grad import MLPGrad

    torch.manual_seed(0)
    net = MLP((1, 3, 3), 4, hidden=hidden)
    x, y = torch.randn(3, 1, 3, 3), torch.tensor([0, 3, 1])
    mask = None
    if masked:  # each sample may only use two classes
        allowed = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
        mask = torch.zeros(3, 4).masked_fill(~allowed, MASK_VALUE)
        y = torch.tensor([0, 3, 1])
    logits = net(x) if mask is None else net(x).masked_fill(mask < 0, MASK_VALUE)
    loss = F.cross_entropy(logits, y)
    expected = torch.autograd.grad(loss, list(net.parameters()))

    step = MLPGrad(net, next(net.parameters()))
    with torch.no_grad():
        got = step.grad([p.detach() for p in net.parameters()], x.reshape(3, -1),
                        F.one_hot(y, 4).float(), mask)
    torch.testing.assert_close(got, loss.detach())
    for g, e in zip(step.g_views, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert step.g.abs().sum() > 0
