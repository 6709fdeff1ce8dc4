"""Functional backbones for continual and meta-learning.

Every backbone keeps *all* of its learnable tensors in one flat ``nn.ParameterList`` and
implements ``forward`` with explicit ``torch.nn.functional`` calls that read weights from a
list. That lets meta-learners (MAML, La-MAML, ...) run the same network on "fast weights"
(plain tensors produced by an inner-loop update, possibly with ``create_graph=True``) and lets
``torch.func.vmap`` evaluate many weight sets at once, without ``torch.func.functional_call``
or module surgery.

Contract relied upon by the rest of the code base::

    model = Backbone(input_shape, n_outputs, **hparams)
    logits = model(x)                                  # own parameters
    logits = model(x, params=fast_weights)             # same order as list(model.parameters())
    feats = model.features(x)                          # (B, model.feature_dim) penultimate features
    logits = model.head(feats)                         # the final linear layer alone

Every backbone ends in one linear layer whose weight and bias are the *last two* parameters;
subclasses implement ``_features`` (everything before it) and the base class adds the head.

Gated backbones (HAT's hard attention, ``metacl.methods.hat``) also provide::

    model.gate_sizes                                   # units of each gated layer, forward order
    feats = model.features(x, gates=[g_1, ..., g_L])   # g_l (units_l,): multiplies layer l's output
    masks = model.gate_param_masks([m_1, ..., m_L])    # per parameter: min(mask of the unit it
                                                       # reads from, of the unit it writes to);
                                                       # None for the head

``MLP`` (every hidden layer) and ``AlexNet`` (``metacl.models.alexnet``) are gated.

Configs name a backbone by its class (``conf/model/*.yaml``: ``_target_``); ``alexnet.py`` and
``conv4.py`` build on ``Backbone`` here, and nothing here imports them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metacl.errors import ConfigError

__all__ = ["MLP", "Backbone", "PcCNN", "ResNet18", "gated_backbones"]


class Backbone(nn.Module):
    """Base class: a flat parameter list plus a forward that can run on external weights.

    Subclasses append their parameters to ``self.params`` in the exact order in which
    ``_forward`` consumes them, and must not register parameters anywhere else (otherwise
    ``list(self.parameters())`` would no longer match the order ``_forward`` expects).
    The default ``_forward`` is ``_features`` followed by a linear head made of the last two
    parameters; a subclass implements ``_features`` and sets ``feature_dim``.

    ``auto_device(settings)``: ``"cpu"`` where a GPU cannot win for the backbone built with
    these model settings, so that ``trainer.accelerator=auto`` trains it on the CPU even when
    CUDA is visible (metacl.runner.trainer.auto_device); None lets Lightning pick.
    """

    @classmethod
    def auto_device(cls, settings: dict) -> str | None:
        return None

    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, **hparams) -> None:
        super().__init__()
        if hparams:
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameters: {sorted(hparams)}"
            )
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n_outputs = int(n_outputs)
        self.params = nn.ParameterList()

    def forward(self, x: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
        """Return logits of shape (B, n_outputs).

        ``params``: tensors in the order of ``list(self.parameters())``; None uses the module's
        own parameters.
        """
        if params is None:
            params = list(self.params)
        elif len(params) != len(self.params):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.params)} parameter tensors, "
                f"got {len(params)}"
            )
        it = iter(params)
        out = self._forward(x, it)
        # A leftover tensor means registration and forward order drifted apart: fail loudly
        # rather than silently ignoring a weight.
        if next(it, None) is not None:
            raise RuntimeError(f"{type(self).__name__}._forward did not consume every parameter")
        return out

    def features(self, x: Tensor, params: Sequence[Tensor] | None = None,
                 gates: Sequence[Tensor] | None = None) -> Tensor:
        """Penultimate features (B, feature_dim): the whole network except its final linear layer.

        ``params`` as in ``forward`` (all of them, head included; the head's are not used).
        ``gates``: gated backbones only, one (units,) tensor per entry of ``gate_sizes``.
        """
        if gates is not None and not self.gate_sizes:
            raise ConfigError(f"model {type(self).__name__} has no gated layers; "
                              f"gated models: {', '.join(gated_backbones())}")
        params = list(self.params) if params is None else list(params)
        if len(params) != len(self.params):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.params)} parameter tensors, "
                f"got {len(params)}"
            )
        it = iter(params[:-2])
        out = self._features(x, it) if gates is None else self._features(x, it, gates=gates)
        if next(it, None) is not None:
            raise RuntimeError(f"{type(self).__name__}._features did not consume every parameter")
        return out

    def head(self, features: Tensor, params: Sequence[Tensor] | None = None) -> Tensor:
        """The final linear layer on ``features``: ``model.head(model.features(x)) == model(x)``."""
        weight, bias = (list(self.params) if params is None else list(params))[-2:]
        return F.linear(features, weight, bias)

    def _forward(self, x: Tensor, params: Iterator[Tensor]) -> Tensor:
        return F.linear(self._features(x, params), next(params), next(params))

    gate_sizes: tuple[int, ...] = ()  # gated backbones: units of each gated layer

    def gate_param_masks(self, unit_masks: Sequence[Tensor]) -> list[Tensor | None]:
        """Gated backbones: a mask per parameter (see the module docstring)."""
        raise ConfigError(f"model {type(self).__name__} has no gated layers; "
                          f"gated models: {', '.join(gated_backbones())}")

    def _features(self, x: Tensor, params: Iterator[Tensor]) -> Tensor:
        raise NotImplementedError

    def _add(self, *tensors: Tensor) -> None:
        """Append tensors (typically taken from a throw-away nn layer) as parameters."""
        for t in tensors:
            self.params.append(t if isinstance(t, nn.Parameter) else nn.Parameter(t))


def _conv_out(size: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> int:
    """Spatial size after a convolution / pooling with the given geometry."""
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


class MLP(Backbone):
    """Fully connected ReLU network; default 784-100-100-10 is La-MAML's MNIST learner.

    cpu_threads = 1: with `threads: auto` a CPU run uses one intra-op thread (the single-sample
    and 10-sample operations of the MNIST methods are too small to split; docs/architecture.md).
    auto_device: with hidden layers of at most SMALL_WIDTH units (La-MAML's 100-100 learner,
    the sinusoid's 40-40), `trainer.accelerator=auto` trains on the CPU even where CUDA is
    visible: its kernels are too small for a GPU to win (the default run trained in 43 s on an
    H200 and in 17-27 s on a 2-core CPU, issue #20). HAT's 2000-2000 network keeps the GPU.
    `trainer=gpu` always uses the GPU.

    init: ``kaiming_normal`` (La-MAML's learner: kaiming-normal weights, zero biases) or
    ``torch`` (PyTorch's default ``nn.Linear``: kaiming-uniform a=sqrt(5), uniform bias).
    input_dropout / dropout: dropout on the input and after every hidden ReLU in training mode
    (HAT's MLP: 0.2 / 0.5; default 0, no dropout). Every hidden layer is gated (HAT): its gate
    multiplies the layer's output after the ReLU and dropout.
    """

    SMALL_WIDTH = 256

    @classmethod
    def auto_device(cls, settings: dict) -> str | None:
        widths = [int(h) for h in settings.get("hidden", (100, 100))]
        return "cpu" if max(widths, default=0) <= cls.SMALL_WIDTH else None

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        hidden: Sequence[int] = (100, 100),
        init: str = "torch",
        input_dropout: float = 0.0,
        dropout: float = 0.0,
        **hparams,
    ) -> None:
        super().__init__(input_shape, n_outputs, **hparams)
        self.cpu_threads = 1
        if init not in ("torch", "kaiming_normal"):
            raise ConfigError(f"model.init={init} is not supported; allowed: torch, "
                              "kaiming_normal")
        for name, value in (("input_dropout", input_dropout), ("dropout", dropout)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"model.{name}={value} is invalid; it must be in [0, 1)")
        self.input_dropout, self.dropout = float(input_dropout), float(dropout)
        self.hidden = tuple(int(h) for h in hidden)
        self.gate_sizes = self.hidden
        sizes = [math.prod(self.input_shape), *self.hidden, self.n_outputs]
        self.feature_dim = sizes[-2]
        for fan_in, fan_out in itertools.pairwise(sizes):
            layer = nn.Linear(fan_in, fan_out)
            if init == "kaiming_normal":
                nn.init.kaiming_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
            self._add(layer.weight, layer.bias)

    def _features(self, x: Tensor, params: Iterator[Tensor],
                  gates: Sequence[Tensor] | None = None) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if self.input_dropout:
            x = F.dropout(x, self.input_dropout, self.training)
        for layer in range(len(self.hidden)):
            x = F.relu(F.linear(x, next(params), next(params)))
            if self.dropout:
                x = F.dropout(x, self.dropout, self.training)
            if gates is not None:
                x = x * gates[layer]
        return x

    @property
    def plain(self) -> bool:
        """Linear + ReLU layers only (no dropout): what the hand-written backward passes of
        La-MAML's MLP glance and of metacl.models.mlp_grad compute."""
        return not (self.input_dropout or self.dropout)

    def gate_param_masks(self, unit_masks: Sequence[Tensor]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for layer, post in enumerate(unit_masks):
            if layer == 0:  # the input pixels are not gated
                weight = post[:, None].expand_as(self.params[0])
            else:
                weight = torch.minimum(post[:, None], unit_masks[layer - 1][None, :])
            out += [weight, post]
        return out + [None, None]  # the head


# --------------------------------------------------------------------------------------------
# La-MAML's pc_cnn
# --------------------------------------------------------------------------------------------


class PcCNN(Backbone):
    """La-MAML's ``pc_cnn``: stride-2 3x3 convs (160 ch) + ReLU, then a 3-layer ReLU MLP head.

    La-MAML uses 3 convs and 320-unit hidden layers for CIFAR-100 (32x32) and 4 convs with
    640 units for TinyImageNet (64x64); both shrink the image to 4x4 before flattening. The
    defaults follow that rule: inputs up to 32 px get (3, 320), larger ones (4, 640).

    init: La-MAML's learner has two initialisations. ``kaiming_normal`` (its default):
    kaiming-normal weights, zero biases. ``xavier_normal`` (its ``--xav_init``, passed by every
    Meta-BGD command of its run_experiments.sh): Xavier-normal weights, convolution biases drawn
    from N(0, 2 / (1 + 9 * out_channels)), zero linear biases. The scale differs a lot: with
    kaiming the first convolution (fan-in 27) has weights of std 0.27 against 0.037, and the
    untrained logits have std ~1.3 against ~0.03, so on CIFAR-shaped noise one inner SGD step
    of 0.1 multiplies the loss by 8 (32 px) to 50 (64 px) where with Xavier it lowers it
    (docs/methods/meta_bgd.md, "Initialisation").
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        channels: int = 160,
        n_conv: int | None = None,
        hidden: int | None = None,
        init: str = "kaiming_normal",
        **hparams,
    ) -> None:
        super().__init__(input_shape, n_outputs, **hparams)
        if len(self.input_shape) != 3:
            raise ValueError(f"PcCNN needs a (C, H, W) input shape, got {self.input_shape}")
        if init not in self.INITS:
            raise ConfigError(f"model.init={init} is not supported; allowed: "
                              + ", ".join(self.INITS))
        self.init = init
        in_ch, h, w = self.input_shape
        small = max(h, w) <= 32
        self.channels = int(channels)
        self.n_conv = int(n_conv) if n_conv is not None else (3 if small else 4)
        self.hidden = int(hidden) if hidden is not None else (320 if small else 640)

        for i in range(self.n_conv):
            weight = torch.empty(self.channels, in_ch if i == 0 else self.channels, 3, 3)
            self._add(*self._initialised(weight, conv=True))
            h, w = _conv_out(h, stride=2), _conv_out(w, stride=2)
        self.flat_features = self.channels * h * w

        self.feature_dim = self.hidden
        sizes = [self.flat_features, self.hidden, self.hidden, self.n_outputs]
        for fan_in, fan_out in itertools.pairwise(sizes):
            self._add(*self._initialised(torch.empty(fan_out, fan_in), conv=False))

    INITS = ("kaiming_normal", "xavier_normal")

    def _initialised(self, weight: Tensor, conv: bool) -> tuple[Tensor, Tensor]:
        """(weight, bias) of one layer, drawn as `init` says (see the class docstring)."""
        bias = torch.zeros(weight.shape[0])
        if self.init == "kaiming_normal":
            nn.init.kaiming_normal_(weight)
        else:
            nn.init.xavier_normal_(weight)
            if conv:
                bias.normal_(0.0, math.sqrt(2.0 / (1 + 9 * weight.shape[0])))
        return weight, bias

    def _features(self, x: Tensor, params: Iterator[Tensor]) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        for _ in range(self.n_conv):
            x = F.relu(F.conv2d(x, next(params), next(params), stride=2, padding=1))
        x = x.reshape(x.shape[0], -1)
        x = F.relu(F.linear(x, next(params), next(params)))
        return F.relu(F.linear(x, next(params), next(params)))


# --------------------------------------------------------------------------------------------
# Reduced ResNet-18 (GEM / A-GEM)
# --------------------------------------------------------------------------------------------


class ResNet18(Backbone):
    """Reduced ResNet-18 of GEM / A-GEM: BasicBlocks [2, 2, 2, 2] with widths nf..8nf.

    Layout: 3x3 stem conv (stride 1, no bias) + BN + ReLU; four stages of two BasicBlocks
    (first block of stages 2-4 has stride 2, with a 1x1 conv + BN shortcut whenever shape
    changes); 4x4 average pooling; linear classifier. With nf=20 and 32x32 inputs the
    classifier sees 160 features.

    Batch norm is functional: its affine weight/bias live in the parameter list (so fast
    weights cover them), its running statistics are buffers. With ``track_running_stats=True``
    they are used in eval mode and updated in train mode, exactly like ``nn.BatchNorm2d``.
    With ``track_running_stats=False`` batch statistics are always used and nothing is
    written in place, which is what ``torch.func.vmap`` over parameter sets requires.
    """

    stage_blocks = (2, 2, 2, 2)

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_outputs: int,
        nf: int = 20,
        track_running_stats: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        **hparams,
    ) -> None:
        super().__init__(input_shape, n_outputs, **hparams)
        if len(self.input_shape) != 3:
            raise ValueError(f"ResNet18 needs a (C, H, W) input shape, got {self.input_shape}")
        in_ch, h, w = self.input_shape
        self.nf = int(nf)
        self.track_running_stats = bool(track_running_stats)
        self.bn_momentum = bn_momentum
        self.bn_eps = bn_eps
        self._n_bn = 0

        # Registration order below must mirror _forward exactly.
        self._add_conv_bn(in_ch, self.nf, kernel=3)
        # Per block: (stride, has_shortcut); consumed by _forward.
        self.blocks: list[tuple[int, bool]] = []
        planes_in = self.nf
        for stage, n_blocks in enumerate(self.stage_blocks):
            planes = self.nf * 2**stage
            for b in range(n_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                shortcut = stride != 1 or planes_in != planes
                self._add_conv_bn(planes_in, planes, kernel=3)
                self._add_conv_bn(planes, planes, kernel=3)
                if shortcut:
                    self._add_conv_bn(planes_in, planes, kernel=1)
                self.blocks.append((stride, shortcut))
                h, w = _conv_out(h, stride=stride), _conv_out(w, stride=stride)
                planes_in = planes

        h, w = _conv_out(h, 4, 4, 0), _conv_out(w, 4, 4, 0)  # avg_pool2d(4)
        if h < 1 or w < 1:
            raise ValueError(f"input {self.input_shape} too small for ResNet18's 4x4 pooling")
        self.flat_features = planes_in * h * w
        self.feature_dim = self.flat_features
        head = nn.Linear(self.flat_features, self.n_outputs)
        self._add(head.weight, head.bias)

    def _add_conv_bn(self, c_in: int, c_out: int, kernel: int) -> None:
        # nn.Conv2d only to get PyTorch's default init; GEM's convs have no bias (BN follows).
        conv = nn.Conv2d(c_in, c_out, kernel, bias=False)
        self._add(conv.weight, torch.ones(c_out), torch.zeros(c_out))
        if self.track_running_stats:
            self.register_buffer(f"bn{self._n_bn}_mean", torch.zeros(c_out))
            self.register_buffer(f"bn{self._n_bn}_var", torch.ones(c_out))
        self._n_bn += 1

    def _conv_bn(
        self, x: Tensor, params: Iterator[Tensor], bn_idx: int, stride: int, padding: int
    ) -> Tensor:
        x = F.conv2d(x, next(params), None, stride=stride, padding=padding)
        weight, bias = next(params), next(params)
        if self.track_running_stats:
            return F.batch_norm(
                x,
                getattr(self, f"bn{bn_idx}_mean"),
                getattr(self, f"bn{bn_idx}_var"),
                weight,
                bias,
                training=self.training,
                momentum=self.bn_momentum,
                eps=self.bn_eps,
            )
        return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.bn_eps)

    def _features(self, x: Tensor, params: Iterator[Tensor]) -> Tensor:
        x = x.reshape(x.shape[0], *self.input_shape)
        bn = iter(range(self._n_bn))
        out = F.relu(self._conv_bn(x, params, next(bn), stride=1, padding=1))
        for stride, has_shortcut in self.blocks:
            h = F.relu(self._conv_bn(out, params, next(bn), stride=stride, padding=1))
            h = self._conv_bn(h, params, next(bn), stride=1, padding=1)
            if has_shortcut:
                out = self._conv_bn(out, params, next(bn), stride=stride, padding=0)
            out = F.relu(h + out)
        out = F.avg_pool2d(out, 4)
        return out.reshape(out.shape[0], -1)


# The model configs: Hydra's `_target_` is the only registry of backbones.
MODEL_CONFIGS = Path(__file__).resolve().parents[3] / "conf" / "model"


def gated_backbones() -> list[str]:
    """The model configs (conf/model/*.yaml) whose backbone has gated layers (HAT can use them)."""
    import yaml
    from hydra.utils import get_class

    names = []
    for path in sorted(MODEL_CONFIGS.glob("*.yaml")):
        cls = get_class(yaml.safe_load(path.read_text())["_target_"])
        if issubclass(cls, Backbone) and cls.gate_param_masks is not Backbone.gate_param_masks:
            names.append(path.stem)
    return names
