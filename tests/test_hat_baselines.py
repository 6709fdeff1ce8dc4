"""HAT's reference approaches: IMM (mean, mode), SGD-frozen, Random."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from metacl.errors import ConfigError
from metacl.methods.finetune import FrozenFeatures, Random
from metacl.methods.imm import IMM
from metacl.models import MLP
from metacl.task_info import TaskInfo

SHAPE = (1, 3, 3)
INFO = TaskInfo(3, SHAPE, 6, ((0, 1), (2, 3), (4, 5)), "class")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fake_dm(n=8):
    tasks = []
    for classes in INFO.task_classes:
        y = torch.tensor(classes).repeat(n // 2)
        tasks.append(SimpleNamespace(x_train=torch.randn(n, *SHAPE) + y[:, None, None, None],
                                     y_train=y))
    return SimpleNamespace(tasks=tasks, prepare_batch=lambda x, train: x.float())


def detached(method):
    method.optimizers = lambda: method.optimizer
    method.manual_backward = lambda loss: loss.backward()
    return method


def imm(merge, **kwargs):
    return detached(IMM(MLP(SHAPE, 6, hidden=(4,)), INFO, merge=merge, **kwargs))


def test_mean_imm_merges_into_the_running_average():
    method, dm = imm("mean"), fake_dm()
    method.before_task(0, dm)
    method.after_task(0, dm)
    assert all(torch.equal(p, q) for p, q in zip(method.backbone.parameters(),
                                                 method.previous.module.parameters()))
    previous = [torch.full_like(p, 3.0) for p in method.backbone.parameters()]
    with torch.no_grad():
        for q, v in zip(method.previous.module.parameters(), previous):
            q.copy_(v)
        for p in method.backbone.parameters():
            p.fill_(6.0)
    method.before_task(2, dm)
    method.after_task(2, dm)  # t = 2: (theta_2 + 2 theta_prev) / 3 = (6 + 6) / 3
    for p, q in zip(method.backbone.parameters(), method.previous.module.parameters()):
        assert torch.allclose(p, torch.full_like(p, 4.0)) and torch.equal(p, q)


def test_mode_imm_merges_with_fisher_weights():
    method, dm = imm("mode"), fake_dm()
    params = list(method.backbone.parameters())
    with torch.no_grad():
        for q in method.previous.module.parameters():
            q.fill_(1.0)
        for p in params:
            p.fill_(4.0)
        for f in method.fisher:
            f.fill_(2.0)
        method.fisher[0][0, 0] = 0.0
    new = [torch.ones_like(p) for p in params]
    new[0][0, 0] = 0.0  # both Fishers zero here: the new weight is kept
    method.merge_into(1, new)
    # (F_new * 4 + F_old * 1) / (F_new + F_old) = (1 * 4 + 2 * 1) / 3 = 2
    assert float(params[0][0, 0].detach()) == 4.0
    assert torch.allclose(params[0].flatten()[1:], torch.full((params[0].numel() - 1,), 2.0))
    assert torch.allclose(params[1], torch.full_like(params[1], 2.0))
    # after_task adds the task's Fisher to the running sum
    method.before_task(1, dm)
    before = [f.clone() for f in method.fisher]
    method.after_task(1, dm)
    assert any(not torch.equal(a, b) for a, b in zip(method.fisher, before))
    assert all((a >= b).all() for a, b in zip(method.fisher, before))


def test_l2_transfer_penalty_pulls_towards_the_previous_model():
    method, dm = imm("mean", l2_transfer=0.5), fake_dm()
    method.before_task(0, dm)
    method.after_task(0, dm)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    n = sum(p.numel() for p in method.backbone.parameters())
    assert float(method.penalty().detach()) == pytest.approx(n / 2)
    x, y = dm.tasks[1].x_train, dm.tasks[1].y_train
    t = torch.ones_like(y)
    ce = method.loss(method.backbone(x), y, t).detach()
    assert float(method.objective(x, y, t).detach()) == pytest.approx(float(ce) + 0.5 * n / 2, rel=1e-5)
    with pytest.raises(ConfigError, match="merge='median'"):
        imm("median")


def test_sgd_frozen_trains_only_the_head_after_the_first_task():
    method, dm = detached(FrozenFeatures(MLP(SHAPE, 6, hidden=(4,)), INFO, lr=0.5)), fake_dm()
    for t in range(2):
        method.before_task(t, dm)
        shared = [p.detach().clone() for p in method.backbone.parameters()]
        x, y = dm.tasks[t].x_train, dm.tasks[t].y_train
        for _ in range(3):
            method.observe(x, y, torch.full_like(y, t))
        moved = [not torch.equal(a, b) for a, b in zip(method.backbone.parameters(), shared)]
        assert moved == ([True] * 4 if t == 0 else [False, False, True, True])
        method.after_task(t, dm)
    fresh = FrozenFeatures(MLP(SHAPE, 6, hidden=(4,)), INFO)
    fresh.load_state_dict(method.state_dict())
    assert [p.requires_grad for p in fresh.backbone.parameters()] == [False, False, True, True]


def test_random_never_trains():
    method = Random(MLP(SHAPE, 6, hidden=(4,)), INFO)
    assert all(method.training_tasks(t, 3) == [] for t in range(3))


def test_pnn_earlier_columns_are_frozen_and_their_outputs_kept():
    from metacl.methods.pnn import PNN

    method, dm = detached(PNN(MLP(SHAPE, 6, hidden=(5, 4)), INFO, lr=0.5)), fake_dm()
    x0 = dm.tasks[0].x_train
    for t in range(3):
        method.before_task(t, dm)
        if t:
            with torch.no_grad():
                before = method(x0, 0).clone()
            column0 = [p.detach().clone() for p in method.columns[0].parameters()]
        x, y = dm.tasks[t].x_train, dm.tasks[t].y_train
        for _ in range(3):
            method.observe(x, y, torch.full_like(y, t))
        if t:
            assert all(torch.equal(a, b) for a, b in zip(method.columns[0].parameters(), column0))
            with torch.no_grad():
                assert torch.equal(method(x0, 0), before)
        method.after_task(t, dm)
    # column 2 reads both earlier columns through its laterals, which learned
    assert len(method.columns[2].laterals) == 2 and method.columns[2].laterals[1].grad is not None
    with pytest.raises(ConfigError, match="needs model=mlp"):
        PNN(torch.nn.Linear(1, 1), INFO)


# ------------------------------------------------------------------------------ PathNet
def pathnet(**kwargs):
    from metacl.methods.pathnet import PathNet

    kwargs = {"n_modules": 5, "modules_per_path": 2, "module_scale": 1.0, "lr": 0.5, **kwargs}
    return detached(PathNet(MLP(SHAPE, 6, hidden=(4, 3)), INFO, **kwargs))


def test_pathnet_paths_have_distinct_modules_before_and_after_mutation():
    method = pathnet(mutation_prob=1.0)
    for path in [*method.random_paths(50), *(method.mutate(method.paths[0]) for _ in range(50))]:
        assert path.shape == (2, 2) and ((0 <= path) & (path < 5)).all()
        assert all(len(set(layer.tolist())) == 2 for layer in path)


def _cyclic_distance(a, b, m):
    d = (a - b) % m
    return torch.minimum(d, m - d)


@pytest.mark.parametrize("mutation_prob", [0.0, 1.0])
def test_pathnet_tournament_overwrites_the_loser_with_a_mutated_winner(mutation_prob):
    method, dm = pathnet(turn_batches=1, mutation_prob=mutation_prob), fake_dm()
    method.before_task(0, dm)
    method.path_loss = lambda p, t: [0.5, 0.2][p]  # controlled fitness: path 1 wins
    x, y = dm.tasks[0].x_train, dm.tasks[0].y_train
    winner = method.paths[1].clone()
    method.observe(x, y, torch.zeros_like(y))  # path 0's turn
    assert int(method.active) == 1 and int(method.winner) == 0
    method.observe(x, y, torch.zeros_like(y))  # path 1's turn ends the generation
    assert int(method.generation) == 1 and int(method.active) == 0 and int(method.winner) == 1
    assert torch.equal(method.paths[1], winner)
    loser = method.paths[0]
    if mutation_prob == 0:
        assert torch.equal(loser, winner)
    else:  # every entry moved by at most mutation_range (2) modulo M, modules kept distinct
        assert (_cyclic_distance(loser, winner, 5) <= 2).all() and not torch.equal(loser, winner)
        assert all(len(set(layer.tolist())) == 2 for layer in loser)


def test_pathnet_generation_restores_the_winner_and_undoes_the_losers_training():
    method, dm = pathnet(turn_batches=1), fake_dm()
    method.before_task(0, dm)
    method.path_loss = lambda p, t: [0.2, 0.5][p]  # path 0 wins
    x, y = dm.tasks[0].x_train, dm.tasks[0].y_train
    method.observe(x, y, torch.zeros_like(y))
    after_winner = [p.detach().clone() for p in method.evolved()]
    method.observe(x, y, torch.zeros_like(y))  # path 1 trains, loses: its updates are undone
    assert all(torch.equal(a, b) for a, b in zip(method.evolved(), after_winner))
    assert float(method.best_loss) == 0.2


def _train_task(method, dm, t, steps=4):
    method.before_task(t, dm)
    x, y = dm.tasks[t].x_train, dm.tasks[t].y_train
    for _ in range(steps):
        method.observe(x, y, torch.full_like(y, t))
    method.after_task(t, dm)


def test_pathnet_freezes_the_best_path_of_earlier_tasks():
    from metacl.methods.finetune import Finetune

    method, dm = pathnet(turn_batches=1), fake_dm()
    x0 = dm.tasks[0].x_train
    _train_task(method, dm, 0)
    method.eval()
    path0 = method.task_paths[0].clone()
    assert (path0 >= 0).all() and int(method.frozen.sum()) == 4  # 2 layers x 2 modules
    before = method(x0, 0).clone()
    modules = [(l.weight[p].clone(), l.bias[p].clone()) for l, p in zip(method.layers, path0)]
    method.train()
    _train_task(method, dm, 1, steps=6)
    method.eval()
    assert torch.equal(method.task_paths[0], path0)
    assert torch.equal(method(x0, 0), before)
    for layer, p, (w, b) in zip(method.layers, path0, modules):
        assert torch.equal(layer.weight[p], w) and torch.equal(layer.bias[p], b)
    assert (method.task_paths[1] >= 0).all()
    # the same data under plain SGD moves task 0's outputs
    sgd, dm = detached(Finetune(MLP(SHAPE, 6, hidden=(4, 3)), INFO, lr=0.5)), fake_dm()
    _train_task(sgd, dm, 0)
    sgd.eval()
    before = sgd(x0, 0).clone()
    sgd.train()
    _train_task(sgd, dm, 1)
    sgd.eval()
    assert not torch.equal(sgd(x0, 0), before)


def test_pathnet_state_dict_holds_the_evolution():
    method, dm = pathnet(turn_batches=1), fake_dm()
    _train_task(method, dm, 0)
    method.before_task(1, dm)
    x, y = dm.tasks[1].x_train, dm.tasks[1].y_train
    method.observe(x, y, torch.ones_like(y))  # inside a generation
    fresh = pathnet(turn_batches=1)
    fresh.load_state_dict(method.state_dict())
    for name in ("paths", "task_paths", "frozen", "active", "winner", "best_loss", "turn_batches"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name
    method.eval(), fresh.eval()
    assert torch.equal(fresh(x, 1), method(x, 1)) and torch.equal(fresh(x, 0), method(x, 0))


def test_pathnet_scores_paths_on_the_validation_split_when_there_is_one():
    method, dm = pathnet(), fake_dm()
    dm.has_validation = True
    for task in dm.tasks:
        task.x_val, task.y_val = task.x_train[:5] * 2, task.y_train[:5]
    method.before_task(1, dm)
    method.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            method.mask_logits(method.task_logits(dm.tasks[1].x_val, 1, method.paths[1]), 1),
            dm.tasks[1].y_val)
    assert method.path_loss(1, 1) == pytest.approx(float(expected))


def test_pathnet_matches_the_models_size_and_refuses_other_models():
    from metacl.methods.pathnet import PathNet

    backbone = MLP(SHAPE, 6, hidden=(40, 40))
    method = PathNet(backbone, INFO)
    size = sum(p.numel() for p in backbone.parameters())
    assert 0.8 * size <= sum(p.numel() for p in method.evolved()) <= size
    with pytest.raises(ConfigError, match="needs model=mlp|from model=mlp"):
        PathNet(torch.nn.Linear(1, 1), INFO)


# ------------------------------------------------------------------------------ conv PNN
def test_conv_pnn_columns_are_frozen_have_laterals_and_the_references_sizes():
    from metacl.methods.pnn import PNN
    from metacl.models.alexnet import AlexNet

    shape = (3, 16, 16)
    info = TaskInfo(3, shape, 6, ((0, 1), (2, 3), (4, 5)), "class")
    backbone = AlexNet(shape, 6, channels=(20, 20, 20), hidden=30)
    method = detached(PNN(backbone, info, lr=0.5))
    # 1.117 / 3 of every width, as the reference shrinks its columns
    assert [c.out_channels for c in method.columns[0].convs] == [7, 7, 7]
    assert method.columns[0].fcs[0].out_features == 11 and method.columns[0].laterals is None
    tasks = []
    for classes in info.task_classes:
        y = torch.tensor(classes).repeat(4)
        tasks.append(SimpleNamespace(x_train=torch.randn(8, *shape) + y[:, None, None, None],
                                     y_train=y))
    dm = SimpleNamespace(tasks=tasks, prepare_batch=lambda x, train: x.float())
    x0 = tasks[0].x_train
    for t in range(3):
        method.before_task(t, dm)
        if t:
            method.eval()
            with torch.no_grad():
                before = method(x0, 0).clone()
            method.train()
            frozen = [p.detach().clone() for c in method.columns[:t] for p in c.parameters()]
        x, y = tasks[t].x_train, tasks[t].y_train
        for _ in range(3):
            method.observe(x, y, torch.full_like(y, t))
        assert method(x, t).shape == (8, 6)
        if t:
            after = [p for c in method.columns[:t] for p in c.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(after, frozen))
            method.eval()
            with torch.no_grad():
                assert torch.equal(method(x0, 0), before)
            method.train()
        method.after_task(t, dm)
    # column 2 reads both earlier columns through 5 adapters (conv2, conv3, fc1, fc2, head)
    laterals = method.columns[2].laterals
    assert len(laterals) == 5 and all(a.scales.shape == (2,) for a in laterals)
    assert isinstance(laterals[0].V, torch.nn.Conv2d) and laterals[0].V.in_channels == 14
    assert all(a.U.weight.grad is not None and a.U.weight.grad.abs().sum() > 0 for a in laterals)
    with pytest.raises(ConfigError, match="column_scale"):
        PNN(backbone, info, column_hidden=[4])
