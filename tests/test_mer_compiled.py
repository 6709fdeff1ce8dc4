"""MER with method.compile=true (metacl.methods.compiled): each single-sample step is one
compiled program; over two tasks (a task switch, a full reservoir) it gives the update of
MER's eager paths, the autograd loop and the hand-written MLP path, on the CPU.

The variants use torch.compile's "aot_eager" backend (the same fullgraph, functionalised
trace, no C++ generated); one case compiles with Inductor, the backend a user run gets.
"""

from __future__ import annotations

import pytest
import torch

from metacl.errors import ConfigError
from metacl.methods.mer import MER
from metacl.models import MLP, PcCNN

from .test_gem_agem_mer import class_info, detached, domain_info, params_vector


def run(path, multi_head=True, clip=0.5, dtype=torch.float32, backbone="mlp", backend=None,
        device="cpu"):
    info = class_info() if multi_head else domain_info()
    torch.manual_seed(5)
    net = (MLP((1, 4, 4), info.n_outputs, hidden=[6, 5]) if backbone == "mlp"
           else PcCNN((1, 4, 4), info.n_outputs, channels=3))
    mer = detached(MER(net.to(dtype), info, lr=0.2, memories=6, replay_batch_size=3,
                       batches_per_example=2, beta=0.3, gamma=0.7, grad_clip_norm=clip,
                       compile=path == "compiled")).to(device)
    if backend is not None:
        mer._compiled.backend = backend
    g = torch.Generator().manual_seed(1)
    for task in (0, 1):  # 8 samples into 6 memories: the reservoir is full in task 1
        x = torch.randn(4, 1, 4, 4, generator=g, dtype=dtype)
        y = torch.tensor(info.task_classes[task])[torch.randint(0, 2, (4,), generator=g)]
        x, y, t = x.to(device), y.to(device), torch.full((4,), task, device=device)
        mer.before_task(task, None)
        loss = mer.observe(x, y, t) if path == "compiled" else getattr(mer, path)(x, y, t)
    return mer, params_vector(mer), loss, mer.memory.x.clone()


@pytest.mark.parametrize("multi_head", [False, True])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_compiled_steps_equal_both_eager_paths(multi_head, clip):
    mer, got, loss, memory = run("compiled", multi_head, clip, backend="aot_eager")
    # sample i: 2 batches of itself + min(3, memories so far) replays, every step compiled
    assert mer._compiled.compiled_calls == sum(2 * (1 + min(3, i)) for i in range(8))
    for path in ("_observe_autograd", "_observe_mlp"):
        _, want, want_loss, want_memory = run(path, multi_head, clip)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(memory, want_memory)  # the same replay draws and reservoir slots
    torch.manual_seed(5)
    initial = params_vector(detached(MER(MLP((1, 4, 4), mer.task_info.n_outputs,
                                             hidden=[6, 5]), mer.task_info)))
    assert (got - initial).abs().max() > 1e-3  # the weights moved


def test_compiled_steps_on_a_conv_backbone():
    _, got, _, _ = run("compiled", backbone="cnn", backend="aot_eager")
    _, want, _, _ = run("_observe_autograd", backbone="cnn")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inductor_step_equals_the_autograd_loop_in_float64():
    mer, got, loss, _ = run("compiled", dtype=torch.float64)
    assert mer._compiled.compiled_calls > 0 and mer._compiled.backend == "inductor"
    _, want, want_loss, _ = run("_observe_autograd", dtype=torch.float64)
    assert float((got - want).abs().max()) < 1e-10
    assert abs(float(loss) - float(want_loss)) < 1e-10


def test_compile_is_refused_where_the_update_is_not_mers_and_allows_32_bit_only():
    class OwnLoss(MER):
        def loss(self, logits, y, t):
            return super().loss(logits, y, t)

    with pytest.raises(ConfigError, match="method.compile=true: OwnLoss changes MER's loss"):
        OwnLoss(MLP((1, 4, 4), 6), class_info(), compile=True)
    assert OwnLoss(MLP((1, 4, 4), 6), class_info())._compiled is None
    assert MER.precisions_for({"compile": True}) == (("32-true",), "method.compile=true")
    assert "bf16-mixed" in MER.precisions_for({"compile": False})[0]
