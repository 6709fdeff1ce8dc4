"""Every run works on a GPU: each continual method end to end on CUDA (rotated digits, and a
CIFAR-100 lookalike in the real pickle format with pc_cnn), each few-shot method, the same
update on CPU and CUDA, resume on the GPU, a GPU checkpoint read on a CPU-only machine, and
`trainer.devices=[k]`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from metacl.checkpoint import Interrupted
from metacl.errors import ConfigError
from metacl.runner.callbacks import InTaskCheckpoints
from metacl.runner.health import DivergedError
from metacl.runner.main import main as run_main
from metacl.validate import validate_config

from ..conftest import CONF, ROOT, compose_cfg
from ..fixtures import write_cifar

pytestmark = pytest.mark.gpu
GPU = ["trainer.accelerator=gpu", "trainer.deterministic=false"]


def _protocol(path: Path) -> str:
    return getattr(get_class(OmegaConf.load(path)._target_), "protocol", "continual")


CONTINUAL = sorted(p.stem for p in (CONF / "method").glob("*.yaml")
                   if _protocol(p) == "continual")
FEWSHOT = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if _protocol(p) == "episodic")
SMALL = ["debug=fast", "save_checkpoints=false", "dataset.limit_train_per_task=20",
         "dataset.limit_test_per_task=20"]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _cifar_experiment(method: str) -> list[str]:
    """The method's own CIFAR-100 experiment where one exists, else its defaults on pc_cnn."""
    for folder in ("lamaml", "baselines", "libcontinual"):
        for name in (f"{method}_cifar100_single_pass", f"{method}_cifar100"):
            if (CONF / "experiment" / folder / f"{name}.yaml").exists():
                return [f"experiment={folder}/{name}"]
    return ["dataset=cifar100", "model=pc_cnn", f"method={method}"]


def _accepts_pc_cnn(method: str) -> bool:
    cfg = compose_cfg([*_cifar_experiment(method), "debug=fast", "paths.output_dir=/tmp/x"])
    try:
        validate_config(cfg)
    except ConfigError:
        return False
    return True


CIFAR_METHODS = [m for m in CONTINUAL if _accepts_pc_cnn(m)]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> Path:
    return write_cifar(tmp_path_factory.mktemp("data"), n_classes=100, train_per_class=10,
                       test_per_class=2)


def _assert_completed(results: dict, n_tasks: int = 2) -> None:
    assert results["status"] == "completed", results.get("error")
    R = results["accuracy_matrix"]
    assert len(R) == n_tasks and all(0.0 <= a <= 1.0 for row in R for a in row)


@pytest.mark.parametrize("method", CONTINUAL)
def test_continual_method_on_cuda_rotated_digits(compose, tmp_path, method):
    run_main(compose([*SMALL, *GPU, f"method={method}", f"paths.output_dir={tmp_path}"]))
    _assert_completed(_results(tmp_path))


@pytest.mark.parametrize("method", CIFAR_METHODS)
def test_continual_method_on_cuda_cifar100_lookalike(compose, tmp_path, cifar100, method):
    cfg = compose([*_cifar_experiment(method), *SMALL, *GPU, f"data_dir={cifar100}",
                   "dataset.source.verify_md5=false", "method.n_epochs=1",
                   f"paths.output_dir={tmp_path}"])
    try:
        run_main(cfg)
    except DivergedError:
        # Some paper settings diverge on this noise-pattern data (the La-MAML family and
        # Meta-BGD do on the CPU too): the run still trained and evaluated on the GPU, and
        # stopped with our divergence check, not a device error.
        assert _results(tmp_path)["status"] == "diverged"
        assert _results(tmp_path)["accuracy_before"] is not None
        return
    _assert_completed(_results(tmp_path))


@pytest.mark.parametrize("method", FEWSHOT)
def test_fewshot_method_on_cuda(compose, tmp_path, method):
    run_main(compose(["debug=fast", *GPU, "dataset=digits_fewshot", f"method={method}",
                      "model=conv4", "dataset.meta_batches_per_epoch=4",
                      "dataset.val_episodes=4", "dataset.test_episodes=16",
                      f"paths.output_dir={tmp_path}"]))
    results = _results(tmp_path)
    assert results["status"] == "completed", results.get("error")
    assert 0.0 <= results["metrics"]["test_acc"] <= 1.0


# ------------------------------------------------------------------ the same update
_DRAWS = ("randperm", "rand", "randn", "randint")


def _draws_on_cpu(monkeypatch) -> None:
    """Random draws made on the CPU generator and moved to the requested device, so both
    devices see the same draws (the update's arithmetic is what is compared)."""
    for name in _DRAWS:
        original = getattr(torch, name)

        def draw(*args, _original=original, device=None, **kwargs):
            out = _original(*args, device="cpu", **kwargs)
            return out if device is None else out.to(device)

        monkeypatch.setattr(torch, name, draw)
    for name in ("randn_like", "rand_like"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda t, *a, _original=original, **k:
                            _original(t.cpu(), *a, **k).to(t.device))


def _one_observe(cfg, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights before, weights after) one observe on the first batch of task 0."""
    pl.seed_everything(0, verbose=False)
    dm = instantiate(cfg.dataset).build().to(device)
    info = dm.task_info
    torch.manual_seed(0)
    method = instantiate(cfg.method, _partial_=True)(
        backbone=instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs),
        task_info=info).to(device)
    dm.batch_size = method.batch_size
    method.before_task(0, dm)
    dm.set_task(0, [0])
    task = dm.tasks[0]
    n = method.batch_size
    x, y = task.x_train[:n], task.y_train[:n]
    batch = dm.prepare_batch(x, False)
    t = torch.zeros(n, dtype=torch.long, device=device)
    before = [p.detach().cpu().clone() for p in method.parameters()]
    torch.manual_seed(1)

    def step(batch_, batch_idx=0):
        method.last_loss = method.observe(batch.to(method.device), y.to(method.device), t)

    method.training_step = step
    pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=1,
               limit_train_batches=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(method, dm)
    return before, [p.detach().cpu().clone() for p in method.parameters()]


@pytest.mark.parametrize("method", [m for m in CONTINUAL if m != "random"])
def test_one_observe_is_the_same_update_on_cpu_and_cuda(compose, monkeypatch, method):
    _draws_on_cpu(monkeypatch)
    cfg = compose(["debug=fast", f"method={method}"])
    before_cpu, after_cpu = _one_observe(cfg, "cpu")
    before_gpu, after_gpu = _one_observe(cfg, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(before_cpu, before_gpu))
    delta_cpu = torch.cat([(a - b).flatten() for a, b in zip(after_cpu, before_cpu)])
    delta_gpu = torch.cat([(a - b).flatten() for a, b in zip(after_gpu, before_gpu)])
    scale = delta_cpu.norm().clamp_min(1e-12)
    assert float((delta_gpu - delta_cpu).norm() / scale) < 1e-4


# ------------------------------------------------------------------ resume and devices
def test_a_gpu_run_resumes_on_the_gpu_and_its_checkpoint_loads_on_a_cpu(compose, tmp_path,
                                                                         monkeypatch):
    common = ["debug=fast", *GPU, "trainer.deterministic=true", "method=er",
              "dataset.limit_train_per_task=20", "checkpoint.every_n_steps=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_main(compose([*common, f"paths.output_dir={full}"]))
    original = InTaskCheckpoints.__call__

    def stop(self, stream, trainer, pl_module, batch_idx):
        if stream.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, stream, trainer, pl_module, batch_idx)

    monkeypatch.setattr(InTaskCheckpoints, "__call__", stop)
    with pytest.raises(Interrupted):
        run_main(compose([*common, f"paths.output_dir={cut}"]))
    monkeypatch.setattr(InTaskCheckpoints, "__call__", original)
    run_main(compose([*common, f"paths.output_dir={cut}", "resume.path=true"]))
    assert _results(cut)["accuracy_matrix"] == _results(full)["accuracy_matrix"]
    # A CPU-only machine reads the GPU checkpoint and reproduces the last row.
    script = (
        "import json, sys, torch\n"
        "from hydra.utils import instantiate\n"
        "from omegaconf import OmegaConf\n"
        "from metacl import checkpoint\n"
        "from metacl.runner.evaluator import Evaluator\n"
        "assert not torch.cuda.is_available()\n"
        "state = checkpoint.load(__import__('pathlib').Path(sys.argv[1]))\n"
        "cfg = OmegaConf.create({k: v for k, v in state['config'].items() if k != 'hydra'})\n"
        "dm = instantiate(cfg.dataset).build()\n"
        "info = dm.task_info\n"
        "m = instantiate(cfg.method, _partial_=True)(backbone=instantiate(cfg.model, "
        "input_shape=info.input_shape, n_outputs=info.n_outputs), task_info=info)\n"
        "m.load_state_dict(state['method_state'])\n"
        "print(json.dumps(Evaluator(dm).accuracy(m, info.n_tasks)[0]))\n")
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script, str(full / "checkpoints" / "last.ckpt")],
                         check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row == pytest.approx(_results(full)["accuracy_matrix"][-1], abs=0.02)


def test_devices_index_is_honoured(compose, tmp_path):
    index = torch.cuda.device_count() - 1
    seen = []
    from metacl.runner import session as session_module

    original = session_module.Session.fit

    def fit(self, trainer, method, dm):
        original(self, trainer, method, dm)
        seen.append((self.device, next(method.parameters()).device,
                     trainer.strategy.root_device))

    session_module.Session.fit = fit
    try:
        run_main(compose([*SMALL, *GPU, "method=er", f"trainer.devices=[{index}]",
                          f"paths.output_dir={tmp_path}"]))
    finally:
        session_module.Session.fit = original
    want = torch.device("cuda", index)
    assert seen and all(s == (want, want, want) for s in seen)
    _assert_completed(_results(tmp_path))


@pytest.mark.parametrize("model,device", [("mlp", "cpu"), ("pc_cnn", "cuda")])
def test_auto_picks_the_device_by_backbone(compose, tmp_path, model, device):
    """trainer.accelerator=auto with a GPU visible: La-MAML's small MLP trains on the CPU
    (issue #20: a GPU loses for it), a conv net on the GPU."""
    from metacl.runner.session import Session

    data = ["dataset=cifar100"] if model == "pc_cnn" else []
    session = Session(compose([*SMALL, *data, f"model={model}", "trainer.accelerator=auto",
                               f"paths.output_dir={tmp_path}"]), tmp_path)
    assert session.device.type == device


@pytest.mark.parametrize("variant", ["lamaml_cifar", "default"])
def test_compiled_glance_replays_as_eager_on_cuda(variant):
    """method.compile=true on CUDA: the glance program (a CUDA graph under reduce-overhead)
    gives the eager update, over batches with a task switch, a full memory and the shorter
    shapes that run uncompiled (tests/test_lamaml_compiled.py checks the same on the CPU)."""
    from tests.test_lamaml_compiled import SECOND_ORDER, max_diff, run

    options = SECOND_ORDER if variant == "lamaml_cifar" else {}
    _, want, want_loss, _ = run(torch.float32, device="cuda", **options)
    m, got, loss, _ = run(torch.float32, device="cuda", compile=True, **options)
    assert m._compiled.cuda_graphs and m._compiled.compiled_calls > 0
    assert max_diff(want, got) < 1e-5
    assert abs(float(want_loss) - float(loss)) < 1e-5


def test_compiled_lamaml_run_on_cuda_cifar100_lookalike(compose, tmp_path, cifar100):
    cfg = compose([*_cifar_experiment("lamaml"), *SMALL, *GPU, "method.compile=true",
                   f"data_dir={cifar100}", "dataset.source.verify_md5=false",
                   f"paths.output_dir={tmp_path}"])
    try:
        run_main(cfg)
    except DivergedError:  # as the eager run may on this data (test above): it trained
        assert _results(tmp_path)["accuracy_before"] is not None
        return
    _assert_completed(_results(tmp_path))


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_mer_compiled_steps_replay_as_eager_on_cuda(backbone):
    """MER with method.compile=true on CUDA (each single-sample step a CUDA graph) gives the
    eager autograd loop's update (tests/test_mer_compiled.py checks the same on the CPU)."""
    from tests.test_mer_compiled import run

    mer, got, loss, _ = run("compiled", backbone=backbone, device="cuda")
    assert mer._compiled.cuda_graphs and mer._compiled.compiled_calls > 0
    _, want, want_loss, _ = run("_observe_autograd", backbone=backbone, device="cuda")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)


def test_meta_bgd_compiled_monte_carlo_gradients_replay_as_eager_on_cuda():
    """Meta-BGD with method.compile=true on CUDA (a CUDA graph per Monte-Carlo sample) gives
    the eager update (tests/test_meta_bgd.py checks the same on the CPU)."""
    from tests.test_meta_bgd import _stream_run

    m, got, losses, _ = _stream_run(True, True, True, device="cuda")
    assert m._mc_program.cuda_graphs and m._mc_program.compiled_calls > 0
    _, want, want_losses, _ = _stream_run(False, True, True, device="cuda")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-5)
