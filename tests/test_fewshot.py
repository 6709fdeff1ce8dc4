"""Few-shot meta-learners: Conv4, vmapped vs per-task gradients, evaluation, end-to-end runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import OmegaConf

from metacl.data.episodic import EpisodeInfo, Episodes
from metacl.errors import ConfigError
from metacl.fewshot.anil import ANIL
from metacl.fewshot.baseline import PretrainFinetune
from metacl.fewshot.learned_lr import PerParameterLR
from metacl.fewshot.maml import MAML, inner_loop
from metacl.fewshot.meta_sgd import MetaSGD
from metacl.fewshot.protonet import ProtoNet
from metacl.models import MLP
from metacl.models.conv4 import Conv4, batch_norm, vmap_safe_batch_norm
from metacl.runner.main import main as run_main

from .conftest import CONF, ROOT

FEWSHOT_METHODS = ["maml", "fomaml", "meta_sgd", "anil", "protonet"]
RESULT_KEYS = {"config", "accuracy_matrix", "accuracy_matrix_agnostic", "accuracy_before",
               "metrics", "timing", "status"}


def _info(ways=3, shots=2, query=3, shape=(1, 28, 28), task="classification"):
    return EpisodeInfo(task, shape, ways if task == "classification" else 1, ways, shots, query,
                       ways, shots, query, 24 if task == "classification" else 0)


def _episodes(tasks=3, ways=3, shots=2, query=3, dtype=torch.float64, seed=0) -> Episodes:
    gen = torch.Generator().manual_seed(seed)
    # Class-dependent images, so adaptation has something to find.
    means = torch.rand(tasks, ways, 1, 28, 28, generator=gen, dtype=dtype)

    def images(k):
        noise = 0.3 * torch.rand(tasks, ways, k, 1, 28, 28, generator=gen, dtype=dtype)
        return (means[:, :, None] + noise).reshape(tasks, ways * k, 1, 28, 28)

    def labels(k):
        return torch.arange(ways).repeat_interleave(k).expand(tasks, -1).contiguous()

    return Episodes(images(shots), labels(shots), images(query), labels(query),
                    torch.arange(ways).expand(tasks, -1).contiguous())


def _make(cls, dtype=torch.float64, channels=8, **kwargs):
    torch.manual_seed(1)
    backbone = Conv4((1, 28, 28), 3, channels=channels).to(dtype)
    return cls(backbone, _info(), **kwargs).to(dtype)


def _meta_grads(method, episodes, vectorize):
    method.vectorize = vectorize
    method.zero_grad(set_to_none=True)
    loss = method.meta_step(episodes)
    return loss, [None if p.grad is None else p.grad.clone() for p in method.parameters()]


# ------------------------------------------------------------------------------------------
# Conv4
# ------------------------------------------------------------------------------------------


def test_conv4_layouts_follow_the_reference():
    omniglot = Conv4((1, 28, 28), 5)
    assert (omniglot.channels, omniglot.max_pool, omniglot.feature_dim) == (64, False, 64)
    assert omniglot.out_hw == (2, 2)
    mini = Conv4((3, 84, 84), 5)
    assert (mini.channels, mini.max_pool, mini.feature_dim) == (32, True, 800)
    assert get_class(OmegaConf.load(CONF / "model" / "conv4.yaml")._target_) is Conv4
    x = torch.rand(4, 3, 84, 84)
    assert mini(x).shape == (4, 5) and mini.features(x).shape == (4, 800)
    params = [p.detach() * 1.0 for p in mini.parameters()]
    assert torch.allclose(mini(x, params), mini(x))
    # 4 blocks x (conv w, conv b, bn scale, bn offset) + head
    assert len(params) == 18


def test_batch_norm_uses_batch_statistics_and_the_explicit_form_matches():
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    fused = batch_norm(x, w, b, 1e-3)
    with vmap_safe_batch_norm():
        explicit = batch_norm(x, w, b, 1e-3)
    assert torch.allclose(fused, explicit, atol=1e-10)
    normed = (fused - b[None, :, None, None]) / w[None, :, None, None]
    assert torch.allclose(normed.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64),
                          atol=1e-10)
    # Eval mode changes nothing: there are no running statistics.
    net = Conv4((1, 28, 28), 3, channels=4)
    x = torch.rand(5, 1, 28, 28)
    out = net(x)
    assert torch.equal(net.eval()(x), out) and not list(net.buffers())


# ------------------------------------------------------------------------------------------
# Inner loop and meta-gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    (MAML, {"first_order": False, "inner_steps": 2}),
    (MAML, {"first_order": True, "inner_steps": 2}),
    (MetaSGD, {"first_order": False, "inner_steps": 1}),
    (MetaSGD, {"first_order": True, "inner_steps": 2}),
    (ANIL, {"first_order": False, "inner_steps": 2}),
    (ProtoNet, {}),
], ids=["maml", "fomaml", "meta_sgd", "meta_sgd_fo", "anil", "protonet"])
def test_vmapped_meta_gradients_equal_the_per_task_loop(case):
    cls, kwargs = case
    method = _make(cls, **kwargs)
    episodes = _episodes()
    loss_loop, loop = _meta_grads(method, episodes, "loop")
    loss_vmap, vmapped = _meta_grads(method, episodes, "vmap")
    assert torch.allclose(loss_loop, loss_vmap, atol=1e-10)
    assert [g is None for g in loop] == [g is None for g in vmapped]
    assert sum(g is not None for g in loop) >= len(loop) - 2  # ProtoNet leaves its head unused
    for a, b in zip(loop, vmapped):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), float((a - b).abs().max())


def test_second_order_differs_from_first_order_and_first_order_is_the_query_gradient():
    episodes = _episodes(tasks=2)
    _, second = _meta_grads(_make(MAML, inner_steps=2), episodes, "loop")
    fo = _make(MAML, inner_steps=2, first_order=True)
    _, first = _meta_grads(fo, episodes, "loop")
    assert any(not torch.allclose(a, b, atol=1e-8) for a, b in zip(first, second))
    # FOMAML: the mean over tasks of the query gradient at the adapted weights.
    expected = [torch.zeros_like(p) for p in fo.parameters()]
    for t in range(2):
        fast = [p.detach().clone() for p in fo.parameters()]
        for _ in range(2):
            fast = [f.requires_grad_() for f in fast]
            g = torch.autograd.grad(F.cross_entropy(fo.backbone(episodes.support_x[t], fast),
                                                    episodes.support_y[t]), fast)
            fast = [(f - 0.4 * gi).detach() for f, gi in zip(fast, g)]
        fast = [f.requires_grad_() for f in fast]
        g = torch.autograd.grad(F.cross_entropy(fo.backbone(episodes.query_x[t], fast),
                                                episodes.query_y[t]), fast)
        expected = [e + gi / 2 for e, gi in zip(expected, g)]
    for a, b in zip(first, expected):
        assert torch.allclose(a, b, atol=1e-10)


def test_inner_loop_takes_sgd_steps_on_the_mean_loss():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0.5, 1.0], dtype=torch.float64)

    def loss(p):
        return ((x @ p[0] - y) ** 2).mean()

    for functional in (True, False):
        (fast,) = inner_loop([w], [0.1], loss, 1, second_order=True, functional=functional)
        (g,) = torch.autograd.grad(loss([w]), [w])
        assert torch.allclose(fast, w - 0.1 * g)
        # Second order: d fast / d w = I - 0.1 * Hessian.
        hessian = 2 * x.t() @ x / 2
        jac = torch.stack([torch.autograd.grad(fast[i], w, retain_graph=True)[0]
                           for i in range(2)])
        assert torch.allclose(jac, torch.eye(2, dtype=torch.float64) - 0.1 * hessian)


def test_meta_sgd_learns_its_rates_also_first_order():
    for first_order in (False, True):
        method = _make(MetaSGD, inner_steps=1, inner_lr=0.05, first_order=first_order)
        assert all(torch.all(a == 0.05) for a in method.learned_lr.alphas)
        assert [a.shape for a in method.learned_lr.alphas] == \
            [p.shape for p in method.backbone.parameters()]
        _, grads = _meta_grads(method, _episodes(tasks=2), "loop")
        n = len(list(method.backbone.parameters()))
        assert all(g is not None and g.abs().sum() > 0 for g in grads[n:])  # the alphas


def test_per_parameter_lr_helper():
    params = [torch.ones(2, 3), torch.ones(3)]
    lr = PerParameterLR(params, init=0.1, per="tensor", nonnegative=True)
    assert [a.shape for a in lr.alphas] == [torch.Size([]), torch.Size([])]
    with torch.no_grad():
        lr.alphas[1].fill_(-1.0)
    new = lr.step(params, [torch.ones(2, 3), torch.ones(3)])
    assert torch.allclose(new[0], torch.full((2, 3), 0.9)) and torch.equal(new[1], params[1])


def test_anil_adapts_only_the_head():
    method = _make(ANIL, inner_steps=1)
    episodes = _episodes(tasks=1)
    params = method.functional_state()
    fast, _, _ = method._views(params, episodes.support_x[0], episodes.query_x[0],
                               detach_inner=True, detach_query=True)
    assert len(fast) == 2 and fast[0] is params[0][-2]
    _, grads = _meta_grads(method, episodes, "loop")
    assert all(g is not None for g in grads)  # the body learns through the outer loop


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------


def test_adapt_and_evaluate_reports_every_step_and_leaves_the_weights_alone():
    method = _make(MAML, inner_steps_test=4, inner_lr=0.5)
    episodes = _episodes(tasks=2)
    before = [p.detach().clone() for p in method.parameters()]
    with torch.no_grad():  # the loop may run under no_grad: adaptation re-enables gradients
        loop = method.adapt_and_evaluate(episodes)
    assert loop["acc"].shape == (2, 5) and loop["loss"].shape == (2, 5)
    assert all(torch.equal(a, b) for a, b in zip(before, method.parameters()))
    # Step 0 is the unadapted network on the query set.
    for t in range(2):
        logits = method.backbone(episodes.query_x[t])
        acc = (logits.argmax(1) == episodes.query_y[t]).float().mean()
        assert torch.allclose(loop["acc"][t, 0], acc)
    assert float(loop["loss"][:, -1].mean()) < float(loop["loss"][:, 0].mean())
    method.vectorize = "vmap"
    vmapped = method.adapt_and_evaluate(episodes)
    assert torch.allclose(loop["acc"], vmapped["acc"]) and \
        torch.allclose(loop["loss"], vmapped["loss"], atol=1e-9)


def test_protonet_scores_queries_by_distance_to_prototypes():
    method = _make(ProtoNet)
    episodes = _episodes(tasks=1)
    sx, sy, qx = episodes.support_x[0], episodes.support_y[0], episodes.query_x[0]
    logits = method.logits(list(method.backbone.parameters()), sx, sy, qx, ways=3)
    embedded = method.backbone.features(torch.cat([sx, qx]))
    prototypes = torch.stack([embedded[:6][sy == c].mean(0) for c in range(3)])
    assert torch.allclose(logits, -torch.cdist(embedded[6:], prototypes) ** 2, atol=1e-8)
    out = method.adapt_and_evaluate(episodes)
    assert out["acc"].shape == (1, 1)


def test_pretrain_finetune_baseline_uses_global_classes():
    method = _make(PretrainFinetune, inner_lr=0.1, inner_steps_test=3)
    assert method.pretrain_head.out_features == 24
    episodes = _episodes(tasks=2)
    method.zero_grad()
    method.meta_step(episodes)
    assert method.pretrain_head.weight.grad is not None
    assert all(p.grad is None for p in list(method.backbone.parameters())[-2:])  # N-way head
    assert method.adapt_and_evaluate(episodes)["acc"].shape == (2, 4)


def test_few_shot_methods_refuse_continual_data_and_vice_versa(compose, tmp_path):
    for method in ("maml", "protonet"):
        cfg = compose(["debug=fast", f"method={method}", f"paths.output_dir={tmp_path}"])
        with pytest.raises(ConfigError, match=r"(MAML|ProtoNet).*continual"):
            run_main(cfg)
    cfg = compose(["debug=fast", "method=er", "dataset=digits_fewshot",
                   f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"ER runs on continual datasets"):
        run_main(cfg)
    # Built directly (not through run.main), a meta-learner refuses a continual task stream.
    from metacl.task_info import TaskInfo

    stream = TaskInfo(2, (1, 28, 28), 10, ((0,), (1,)), "domain")
    with pytest.raises(ConfigError, match="MAML is a few-shot meta-learner.*continual dataset"):
        MAML(Conv4((1, 28, 28), 10), task_info=stream)
    with pytest.raises(ConfigError, match="regression"):
        ProtoNet(MLP((1,), 1), _info(task="regression", shape=(1,)))


# ------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------


def _run(compose, tmp_path, overrides):
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path}", *overrides])
    value = run_main(cfg)
    return cfg, value, json.loads((tmp_path / "results.json").read_text())


@pytest.mark.parametrize("method", FEWSHOT_METHODS)
def test_every_few_shot_method_runs_end_to_end(compose, tmp_path, method):
    cfg, value, results = _run(compose, tmp_path, ["dataset=digits_fewshot", f"method={method}"])
    assert set(results) == RESULT_KEYS and results["status"] == "completed"
    assert results["accuracy_matrix"] is None and results["accuracy_before"] is None
    m = results["metrics"]
    steps = 1 if method == "protonet" else cfg.method.inner_steps_test + 1
    assert len(m["test_acc_per_step"]) == len(m["test_acc_ci95_per_step"]) == steps
    assert m["test_acc"] == m["test_acc_per_step"][-1] and value == m["test_acc"]
    assert m["test_episodes"] == 50  # debug=fast: limit_test_per_task
    assert 0.0 < m["test_acc_ci95"] < 0.2 and 0.0 <= m["test_acc"] <= 1.0
    assert "val_acc" in m and len(m["val_acc_per_epoch"]) == 1
    assert results["timing"]["total_seconds"] >= results["timing"]["train_seconds"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    if method != "protonet":
        # Labels are shuffled per episode: before adaptation the network is at chance, and
        # ten SGD steps on one digit per class already help a lot.
        assert m["test_acc_per_step"][0] < 0.3 < m["test_acc"]


def test_sinusoid_reports_mse(compose, tmp_path):
    _, value, results = _run(compose, tmp_path, [
        "dataset=sinusoid", "method=maml", "model.hidden=[40,40]", "method.inner_lr=0.01"])
    m = results["metrics"]
    assert value == m["test_mse"] == m["test_mse_per_step"][-1]
    assert len(m["test_mse_per_step"]) == 11 and "test_acc" not in m and m["test_mse"] > 0


def test_experiment_files_compose_with_the_reference_hyperparameters(compose):
    experiments = sorted(p.stem for p in (CONF / "experiment" / "maml").glob("*.yaml"))
    assert len(experiments) >= 9
    for name in experiments:
        cfg = compose([f"experiment=maml/{name}"])
        assert cfg.dataset._target_.endswith("EpisodicDataModule"), name
        assert cfg.optimized_metric in ("test_acc", "test_mse"), name
    cells = {  # name: (ways, shots, TF update_lr, steps, meta-batch)
        "omniglot_5w1s": (5, 1, 0.4, 1, 32), "omniglot_5w5s": (5, 5, 0.4, 1, 32),
        "omniglot_20w1s": (20, 1, 0.1, 5, 16), "omniglot_20w5s": (20, 5, 0.1, 5, 16),
        "miniimagenet_5w1s": (5, 1, 0.01, 5, 4), "miniimagenet_5w5s": (5, 5, 0.01, 5, 4),
    }
    for name, (ways, shots, tf_lr, steps, batch) in cells.items():
        cfg = compose([f"experiment=maml/{name}"])
        assert (cfg.dataset.ways, cfg.dataset.shots) == (ways, shots)
        # The reference's inner loss is N times our mean loss.
        assert cfg.method.inner_lr == pytest.approx(ways * tf_lr)
        assert (cfg.method.inner_steps, cfg.method.meta_batch_size) == (steps, batch)
    assert compose(["experiment=maml/miniimagenet_5w1s_fo"]).method.first_order


def test_baseline_experiment_runs(compose, tmp_path):
    _, value, results = _run(compose, tmp_path, [
        "experiment=maml/digits_5w1s_baseline", "model.channels=8",
        "dataset.limit_test_per_task=10", "method.inner_steps_test=3"])
    assert results["config"]["method"]["_target_"] == "metacl.fewshot.baseline.PretrainFinetune"
    assert value == results["metrics"]["test_acc"]


def test_cli_protocol_mismatch_is_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}  # no traceback
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", "method=maml"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "MAML" in lines[-1]
    assert "continual" in lines[-1].lower() and "Traceback" not in out.stderr
