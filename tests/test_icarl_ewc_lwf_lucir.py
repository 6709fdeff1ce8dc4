"""iCaRL, EWC, LwF, LUCIR and their shared pieces: herding, class-balanced memory, Fisher, KD."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metacl.memory import ClassBalancedMemory, herding_selection
from metacl.methods.common import FrozenCopy, diagonal_fisher, kd_loss, scheduled_lr
from metacl.methods.ewc import EWC
from metacl.methods.icarl import ICaRL
from metacl.methods.lucir import LUCIR
from metacl.methods.lwf import LwF
from metacl.models import MLP, PcCNN, ResNet18
from metacl.task_info import TaskInfo

SHAPE = (1, 4, 4)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def class_split_info(task_classes=((0, 1), (2, 3))) -> TaskInfo:
    n_out = max(max(c) for c in task_classes) + 1
    return TaskInfo(n_tasks=len(task_classes), input_shape=SHAPE, n_outputs=n_out,
                    task_classes=tuple(tuple(c) for c in task_classes), scenario="class")


def fake_datamodule(info: TaskInfo, per_class: int = 6):
    """Tasks of uint8 images (class c is bright around level 40 c), prepared by / 255."""
    tasks = []
    for classes in info.task_classes:
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = (40 * y[:, None, None, None] + torch.randint(0, 30, (len(y), *SHAPE))).to(torch.uint8)
        tasks.append(SimpleNamespace(x_train=x, y_train=y))
    prepare = lambda x, train: x.float() / 255
    return SimpleNamespace(tasks=tasks, prepare_batch=prepare)


def train_steps(method, dm, t: int, steps: int = 3) -> None:
    """A few full-batch steps on task t without a Trainer (observe needs one)."""
    task = dm.tasks[t]
    x, y = dm.prepare_batch(task.x_train, True), task.y_train
    for _ in range(steps):
        bx, by, bt = method.glance_batch(x, y, torch.full_like(y, t))
        method.optimizer.zero_grad()
        method.objective(bx, by, bt).backward()
        method.optimizer.step()
        method.after_step()


def run_tasks(method, dm, n_tasks: int | None = None):
    for t in range(n_tasks or len(dm.tasks)):
        method.before_task(t, dm)
        train_steps(method, dm, t)
        method.after_task(t, dm)
    return method


def mlp(info, hidden=(8,)):
    return MLP(info.input_shape, info.n_outputs, hidden=hidden)


# ----------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("make", [
    lambda: MLP((3, 8, 8), 5, hidden=(6, 7)),
    lambda: PcCNN((3, 16, 16), 5, channels=4, hidden=6),
    lambda: ResNet18((3, 32, 32), 5, nf=2).eval(),
])
def test_features_then_head_is_the_forward(make):
    model = make()
    x = torch.randn(3, *model.input_shape)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    torch.testing.assert_close(model.head(feats), model(x))
    fast = [p.detach() + 0.1 for p in model.parameters()]
    torch.testing.assert_close(model.head(model.features(x, fast), fast), model(x, params=fast))


# ----------------------------------------------------------------------------- herding
def brute_force_herding(feats: torch.Tensor, k: int) -> list[int]:
    mu = feats.mean(0)
    chosen: list[int] = []
    for _ in range(k):
        best, best_dist = None, math.inf
        for i in range(len(feats)):
            if i in chosen:
                continue
            mean = (feats[chosen].sum(0) + feats[i]) / (len(chosen) + 1)
            dist = float((mean - mu).norm())
            if dist < best_dist:
                best, best_dist = i, dist
        chosen.append(best)
    return chosen


def test_herding_matches_brute_force_greedy_in_order():
    feats = torch.randn(9, 3, dtype=torch.float64)
    order = herding_selection(feats, 6, normalize=False)
    assert order.tolist() == brute_force_herding(feats, 6)
    # Normalised features (iCaRL's default) give the greedy order of the normalised vectors.
    normed = F.normalize(feats, dim=1)
    assert herding_selection(feats, 9).tolist() == brute_force_herding(normed, 9)
    # The first pick is the sample closest to the mean; asking for more than n returns all n.
    assert order[0] == (feats - feats.mean(0)).norm(dim=1).argmin()
    assert sorted(herding_selection(feats, 50, normalize=False).tolist()) == list(range(9))


def test_herding_prefix_mean_beats_random_subsets():
    feats = torch.randn(40, 5)
    order = herding_selection(feats, 5, normalize=False)
    herd_err = (feats[order].mean(0) - feats.mean(0)).norm()
    random_err = torch.stack([(feats[torch.randperm(40)[:5]].mean(0) - feats.mean(0)).norm()
                              for _ in range(200)])
    assert herd_err < random_err.quantile(0.05)


# ----------------------------------------------------------------------------- memory
def test_class_balanced_memory_shrinks_quotas_and_keeps_prefixes():
    mem = ClassBalancedMemory(10, SHAPE)
    for c in (0, 1):  # task 0: 2 classes share 10 slots -> 5 each
        assert mem.quota(2) == 5
        mem.add(torch.full((5, *SHAPE), 10 * c + 1, dtype=torch.uint8)
                + torch.arange(5, dtype=torch.uint8)[:, None, None, None], c, 0)
    assert len(mem) == 10 and mem.class_counts(5).tolist() == [5, 5, 0, 0, 0]
    with pytest.raises(ValueError, match="overflow"):
        mem.add(torch.zeros(1, *SHAPE, dtype=torch.uint8), 2, 1)
    quota = mem.quota(5)  # task 1 brings 3 classes: 10 // 5 = 2 each
    assert quota == 2
    mem.reduce(quota)
    for c in (2, 3, 4):
        mem.add(torch.full((2, *SHAPE), 100 + c, dtype=torch.uint8), c, 1)
    x, y, t = mem.all()
    assert mem.class_counts(5).tolist() == [2, 2, 2, 2, 2] and len(mem) == 10
    # Old classes kept their two highest-priority exemplars (ranks 0 and 1 = offsets 0 and 1).
    assert sorted(x[y == 0][:, 0, 0, 0].tolist()) == [1, 2]
    assert sorted(x[y == 1][:, 0, 0, 0].tolist()) == [11, 12]
    assert t.tolist() == [0] * 4 + [1] * 6
    sx, sy, _ = mem.sample(4)
    assert len(sy) == 4 and all((sx[i] == x[y == sy[i]]).all(dim=(1, 2, 3)).any()
                                for i in range(4))
    # state_dict round trip, into a memory preallocated with another dtype.
    fresh = ClassBalancedMemory(10, SHAPE, dtype=torch.float32)
    fresh.load_state_dict(mem.state_dict())
    assert len(fresh) == 10 and fresh.x.dtype == torch.uint8 and torch.equal(fresh.x, mem.x)


# ----------------------------------------------------------------------------- EWC
def test_ewc_penalty_zero_at_anchor_and_quadratic():
    info = class_split_info()
    ewc = EWC(mlp(info), info, ewc_lambda=3.0)
    params = list(ewc.backbone.parameters())
    ewc.consolidate([torch.rand_like(p) + 0.1 for p in params])
    assert ewc.penalty().item() == 0.0
    direction = [torch.randn_like(p) for p in params]
    anchor = [p.detach().clone() for p in params]

    def penalty_at(scale):
        with torch.no_grad():
            for p, a, d in zip(params, anchor, direction):
                p.copy_(a + scale * d)
        return ewc.penalty().item()

    p1, p2 = penalty_at(1.0), penalty_at(2.0)
    assert p1 > 0 and p2 == pytest.approx(4 * p1, rel=1e-5)
    x, y, t = torch.rand(4, *SHAPE), torch.tensor([0, 1, 0, 1]), torch.zeros(4, dtype=torch.long)
    expected = ewc.loss(ewc.backbone(x), y, t) + 3.0 / 2 * p2
    assert ewc.objective(x, y, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_online_ewc_accumulates_fisher_with_gamma():
    info = class_split_info()
    ewc = EWC(mlp(info), info, online=True, gamma=0.5)
    params = list(ewc.backbone.parameters())
    f1 = [torch.rand_like(p) for p in params]
    f2 = [torch.rand_like(p) for p in params]
    ewc.consolidate(f1)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ewc.consolidate(f2)
    for f, a, p, g1, g2 in zip(ewc.fisher, ewc.anchor, params, f1, f2):
        torch.testing.assert_close(f, 0.5 * g1 + g2)
        torch.testing.assert_close(a, p.detach())  # the anchor is the latest weights


def test_offline_ewc_equals_one_penalty_per_task():
    info = class_split_info()
    ewc = EWC(mlp(info), info)
    params = list(ewc.backbone.parameters())
    fishers, anchors = [], []
    for _ in range(2):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        fishers.append([torch.rand_like(p) for p in params])
        anchors.append([p.detach().clone() for p in params])
        ewc.consolidate(fishers[-1])
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    stored = torch.autograd.grad(ewc.penalty(), params)
    separate = sum(((f * (p - a).pow(2)).sum() for fs, anc in zip(fishers, anchors)
                    for p, a, f in zip(params, anc, fs)))
    for g, h in zip(stored, torch.autograd.grad(separate, params)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)


def test_diagonal_fisher_per_sample_and_batch_estimators():
    info = class_split_info()
    model = mlp(info)
    x, y, t = torch.rand(5, *SHAPE), torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, dtype=torch.long)
    mask = info.class_mask()

    def mask_fn(logits, tt):
        return logits.masked_fill(~mask[tt], -1e10)

    fisher = diagonal_fisher(model, [(x[:3], y[:3], t[:3]), (x[3:], y[3:], t[3:])], mask_fn)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(5):
        loss = F.cross_entropy(mask_fn(model(x[i : i + 1]), t[i : i + 1]), y[i : i + 1])
        for e, g in zip(expected, torch.autograd.grad(loss, list(model.parameters()))):
            e += g.pow(2) / 5
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e)
    batch = diagonal_fisher(model, [(x, y, t)], mask_fn, estimator="batch")
    mean_grad = torch.autograd.grad(F.cross_entropy(mask_fn(model(x), t), y),
                                    list(model.parameters()))
    for f, g in zip(batch, mean_grad):
        torch.testing.assert_close(f, g.pow(2))  # 5 * g^2 / 5 samples


# ----------------------------------------------------------------------------- LwF / KD
def test_kd_loss_matches_soft_cross_entropy_on_masked_classes():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.tensor([True, True, False, True])
    q = F.softmax(teacher[:, mask] / 2, dim=1)
    expected = -(q * F.log_softmax(student[:, mask] / 2, dim=1)).sum(1).mean()
    torch.testing.assert_close(kd_loss(student, teacher, 2.0, mask), expected)


def test_lwf_targets_come_from_a_frozen_copy_of_the_previous_model():
    info = class_split_info()
    dm = fake_datamodule(info)
    lwf = LwF(mlp(info), info, T=2.0, alpha=0.7)
    run_tasks(lwf, dm, 1)
    lwf.before_task(1, dm)
    assert all(not p.requires_grad for p in lwf.old.parameters())
    x = dm.prepare_batch(dm.tasks[1].x_train, False)
    targets = lwf.old(x)
    torch.testing.assert_close(targets, lwf.backbone(x))  # snapshot of the model at task start
    with torch.no_grad():
        for p in lwf.backbone.parameters():
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(lwf.old(x), targets)  # the live model moved, the copy did not
    assert not lwf.old(x).requires_grad
    y, t = dm.tasks[1].y_train, torch.ones_like(dm.tasks[1].y_train)
    logits = lwf.backbone(x)
    old = torch.tensor([True, True, False, False])
    expected = lwf.loss(logits, y, t) + 0.7 * kd_loss(logits, targets, 2.0, old)
    torch.testing.assert_close(lwf.objective(x, y, t), expected)
    train_steps(lwf, dm, 1)
    assert all(p.grad is None for p in lwf.old.parameters())


# ----------------------------------------------------------------------------- LUCIR
def test_lucir_classifier_is_scaled_cosine_with_learned_sigma():
    info = class_split_info()
    lucir = LUCIR(mlp(info), info, memory_size=8, sigma=3.0)
    head = lucir.classifier
    assert head.sigma.requires_grad
    assert any(p is head.sigma for g in lucir.optimizer.param_groups for p in g["params"])
    feats = torch.randn(5, lucir.backbone.feature_dim)
    logits = head(feats)
    by_hand = torch.stack([torch.stack([3.0 * (f @ w) / (f.norm() * w.norm())
                                        for w in head.weight]) for f in feats])
    torch.testing.assert_close(logits, by_hand)
    assert logits.abs().max() <= 3.0 + 1e-6


def test_lucir_adaptive_lambda_imprinting_and_frozen_old_weights():
    info = class_split_info(((0, 1, 2, 3), (4, 5)))
    dm = fake_datamodule(info)
    lucir = LUCIR(mlp(info), info, memory_size=8, lambda_base=5.0, K=2, lr=0.5)
    run_tasks(lucir, dm, 1)
    old_rows = lucir.classifier.weight[:4].detach().clone()
    lucir.before_task(1, dm)
    assert lucir.cur_lambda == pytest.approx(5.0 * math.sqrt(4 / 2))
    # Imprinted new weights: direction of the mean normalised feature, mean old norm.
    feats = lucir.embed(dm.tasks[1].x_train)
    for c in (4, 5):
        w = lucir.classifier.weight[c]
        direction = F.normalize(feats[dm.tasks[1].y_train == c].mean(0), dim=0)
        torch.testing.assert_close(F.normalize(w, dim=0), direction)
        assert w.norm().item() == pytest.approx(old_rows.norm(dim=1).mean().item(), rel=1e-5)
    sigma = lucir.classifier.sigma.item()
    train_steps(lucir, dm, 1)
    torch.testing.assert_close(lucir.classifier.weight[:4], old_rows)  # frozen
    assert lucir.classifier.sigma.item() != sigma  # the scale keeps learning


# ----------------------------------------------------------------------------- iCaRL
def test_icarl_nme_picks_the_nearest_class_mean():
    info = class_split_info()
    icarl = ICaRL(mlp(info), info, memory_size=8).eval()
    x = torch.rand(6, *SHAPE)
    # No exemplars yet: the plain head decides.
    torch.testing.assert_close(icarl.predict(x, 0), icarl.predict(x, 0, variant="head"))
    means = F.normalize(torch.randn(4, icarl.backbone.feature_dim), dim=1)
    icarl.class_means.copy_(means)
    icarl.class_means_valid.copy_(torch.tensor([True, True, True, False]))
    feats = F.normalize(icarl.backbone.features(x), dim=1)
    dist = torch.cdist(feats, means)
    assert icarl.predict(x, 0).tolist() == dist[:, :2].argmin(1).tolist()  # task 0's classes
    everything = torch.ones(4, dtype=torch.bool)
    # Task-agnostic: the nearest among allowed classes that have exemplars (class 3 has none).
    assert icarl.predict(x, 0, allowed=everything).tolist() == dist[:, :3].argmin(1).tolist()


def test_icarl_bce_uses_old_model_sigmoids_as_old_class_targets():
    info = class_split_info()
    dm = fake_datamodule(info)
    icarl = ICaRL(mlp(info), info, memory_size=8, distill_weight=1.0)
    run_tasks(icarl, dm, 1)
    assert icarl.memory.class_counts(4).tolist() == [4, 4, 0, 0]
    icarl.before_task(1, dm)
    with torch.no_grad():
        for p in icarl.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.rand(3, *SHAPE), torch.tensor([2, 3, 0])
    logits, old = icarl.backbone(x), icarl.old(x)
    targets = torch.cat([torch.sigmoid(old[:, :2]), F.one_hot(y, 4)[:, 2:].float()], dim=1)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3
    torch.testing.assert_close(icarl.objective(x, y, torch.ones_like(y)), expected)


def test_icarl_exemplars_are_the_herding_order_of_each_class():
    info = class_split_info()
    dm = fake_datamodule(info)
    icarl = run_tasks(ICaRL(mlp(info), info, memory_size=6), dm, 1)
    x, y, _ = icarl.memory.all()
    task = dm.tasks[0]
    feats = icarl.embed(task.x_train)
    for c in (0, 1):
        idx = torch.nonzero(task.y_train == c).flatten()
        order = herding_selection(feats[idx], 3, normalize=False)
        assert torch.equal(x[y == c], task.x_train[idx[order]])
    # Class means: normalised mean of the exemplars' normalised features.
    mean0 = F.normalize(icarl.embed(x[y == 0]).mean(0), dim=0)
    torch.testing.assert_close(icarl.class_means[0], mean0)


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("make", [
    lambda info: ICaRL(mlp(info), info, memory_size=8),
    lambda info: LwF(mlp(info), info),
    lambda info: EWC(mlp(info), info, online=True, gamma=0.9),
    lambda info: LUCIR(mlp(info), info, memory_size=8),
])
def test_state_dict_round_trip_restores_everything(make):
    info = class_split_info()
    dm = fake_datamodule(info)
    trained = run_tasks(make(info), dm)
    fresh = make(info)
    fresh.load_state_dict(trained.state_dict())
    for (name, a), (_, b) in zip(trained.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.rand(5, *SHAPE)
    trained.eval()
    fresh.eval()
    for variant in (None, *trained.eval_variants):
        for allowed in (None, torch.ones(4, dtype=torch.bool)):
            assert torch.equal(trained.predict(x, 1, allowed, variant),
                               fresh.predict(x, 1, allowed, variant))
    if trained.memory is not None:
        assert len(fresh.memory) == len(trained.memory) == 8
    if hasattr(trained, "old"):
        assert fresh.old.is_ready
    if isinstance(trained, EWC):
        assert fresh._n_consolidated == 2
        torch.testing.assert_close(fresh.penalty(), trained.penalty())


def test_lr_schedules_follow_torch_schedulers():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4], gamma=0.5)
    for epoch in range(6):
        assert scheduled_lr(0.1, epoch, "multistep", [2, 4], 0.5) == pytest.approx(
            opt.param_groups[0]["lr"])
        opt.step()
        multistep.step()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    for epoch in range(5):  # past T_max too
        assert scheduled_lr(0.1, epoch, "cosine", t_max=3) == pytest.approx(
            opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()


def test_frozen_copy_runs_in_eval_mode():
    net = ResNet18((3, 32, 32), 3, nf=2)
    frozen = FrozenCopy(net)
    frozen.update(net)
    frozen.train()
    before = frozen.module.bn0_mean.clone()
    out = frozen(torch.randn(2, 3, 32, 32))
    assert torch.equal(frozen.module.bn0_mean, before)  # running stats untouched
    assert frozen.module.training and not out.requires_grad


# ----------------------------------------------------------------------------- end to end
def test_icarl_class_split_run_writes_nme_and_head_matrices(compose, tmp_path):
    from metacl.runner.main import main as run_main

    from .fixtures import write_cifar

    data = write_cifar(tmp_path / "data", n_classes=10, train_per_class=12, test_per_class=6)
    out = tmp_path / "out"
    cfg = compose([
        "debug=fast", f"paths.output_dir={out}", "method=icarl", "dataset=cifar10",
        f"data_dir={data}", "model=mlp", "dataset.source.verify_md5=false",
        "dataset.limit_train_per_task=null", "dataset.limit_test_per_task=null",
        "dataset.limit_tasks=3", "dataset.augment=false", "method.memory_size=12",
        "method.n_epochs=2", "save_checkpoints=false"])
    run_main(cfg)
    results = json.loads((out / "results.json").read_text())
    aware, agnostic = results["accuracy_matrix"], results["accuracy_matrix_agnostic"]
    assert len(aware) == 3
    for row_aware, row_agnostic in zip(aware, agnostic):
        assert all(a >= g for a, g in zip(row_aware, row_agnostic))
    assert (out / "accuracy_matrix_head.csv").read_text().startswith("after_task,task_0")
