"""Bad input: every row gets exit code 2, one `error:` line naming the key and the bad value,
and leaves the results.json of the run already in the output folder untouched.

Rows go through `cli.run_with_clean_errors(run.main, cfg)` in-process (what train.py runs, minus
the ~8 s of imports); two rows go through the real train.py.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metacl.cli import EXIT_USER_ERROR, run_with_clean_errors
from metacl.methods.finetune import Finetune
from metacl.runner.main import main as run_main

from .conftest import ROOT
from .fixtures import write_cifar


class TaskIdOnlyMethod(Finetune):
    """Stands for a method that cannot run without task ids at test time (e.g. HAT)."""

    needs_task_ids = True


def _cifar(tmp: Path) -> Path:
    return write_cifar(tmp / "cifar", n_classes=10, train_per_class=4, test_per_class=2)


def _truncated_cifar(tmp: Path) -> Path:
    root = _cifar(tmp)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:500])
    return root


def _wrong_shape_cifar(tmp: Path) -> Path:
    root = _cifar(tmp)
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": torch.zeros(8, 100, dtype=torch.uint8).numpy(),
                     "labels": [0] * 8}, f)
    return root


def _bad_jpeg_tiny(tmp: Path) -> Path:
    from .test_sources import _write_tiny

    _write_tiny(tmp / "tiny", "official")
    image = next((tmp / "tiny" / "tiny-imagenet-200" / "train").rglob("*.JPEG"))
    image.write_bytes(b"not a jpeg at all")
    return tmp / "tiny"


def _wrong_shape_mer(tmp: Path) -> Path:
    root = tmp / "mer"
    root.mkdir()
    task = [0.0, torch.zeros(5, 100), torch.zeros(5, dtype=torch.long)]
    torch.save([[task], [task]], root / "mnist_rotations.pt")
    return root


def _truncated_mer(tmp: Path) -> Path:
    root = tmp / "mer"
    root.mkdir()
    task = [0.0, torch.zeros(5, 784), torch.zeros(5, dtype=torch.long)]
    torch.save([[task], [task]], root / "mnist_rotations.pt")
    data = (root / "mnist_rotations.pt").read_bytes()
    (root / "mnist_rotations.pt").write_bytes(data[: len(data) // 2])
    return root


def _crafted_mer(tmp: Path) -> Path:
    """A MER file whose unpickling would run `touch <tmp>/PAYLOAD_RAN` (it must not)."""
    from .test_safe_load import SystemCall

    root = tmp / "mer"
    root.mkdir()
    task = [SystemCall(tmp / "PAYLOAD_RAN"), torch.zeros(5, 784), torch.zeros(5, dtype=torch.long)]
    torch.save([[task], [task]], root / "mnist_rotations.pt")
    return root


def _mnist(tmp: Path, damage: str) -> Path:
    """MNIST's four raw idx files, one of them damaged."""
    import numpy as np

    from .test_sources import _write_idx, _write_mnist

    root = tmp / "mnist"
    _write_mnist(root, n_train=30, n_test=10)
    raw = root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    elif damage == "empty":
        images.write_bytes(b"")
    elif damage == "magic":
        images.write_bytes(b"\x12\x34\x56\x78" + images.read_bytes()[4:])
    elif damage == "labels":
        _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    return root


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


# (id, overrides, data fixture or None, fragments the error line must contain)
CIFAR = ["dataset=cifar10", "model=mlp", "dataset.source.verify_md5=false"]
ROWS = [
    ("zero lr", ["method=er", "method.lr=0"], None, ["method.lr=0", "> 0"]),
    ("negative lr", ["method=finetune", "method.lr=-0.1"], None, ["method.lr=-0.1", "> 0"]),
    ("negative opt_lr", ["method=lamaml", "method.opt_lr=-1"], None, ["method.opt_lr=-1"]),
    ("zero batch_size", ["method.batch_size=0"], None, ["method.batch_size=0", ">= 1"]),
    ("negative memories", ["method=er", "method.memories=-5"], None,
     ["method.memories=-5", ">= 0"]),
    ("zero glances", ["method.glances=0"], None, ["method.glances=0", ">= 1"]),
    ("zero n_epochs", ["method.n_epochs=0"], None, ["method.n_epochs=0", ">= 1"]),
    ("zero threads", ["threads=0"], None, ["threads=0", "auto"]),
    ("unknown allocator", ["cpu_allocator=jemalloc"], None,
     ["cpu_allocator='jemalloc'", "tuned, system"]),
    ("string lr", ["method=er", "method.lr=fast"], None, ["method.lr='fast'"]),
    ("classes not divisible", [*CIFAR, "dataset.n_tasks=3",
                               "dataset.scenario.classes_per_task=null"],
     None, ["dataset.n_tasks=3", "10 classes"]),
    ("init/inc inconsistent", [*CIFAR, "dataset.n_tasks=4",
                               "dataset.scenario.classes_per_task=null",
                               "dataset.scenario.init_cls_num=4",
                               "dataset.scenario.inc_cls_num=3"], None,
     ["dataset.scenario.init_cls_num=4", "dataset.scenario.inc_cls_num=3", "13 classes"]),
    ("init leaves uneven rest", [*CIFAR, "dataset.n_tasks=4",
                                 "dataset.scenario.classes_per_task=null",
                                 "dataset.scenario.init_cls_num=5"], None,
     ["dataset.scenario.init_cls_num=5", "dataset.scenario.inc_cls_num"]),
    ("samples_per_task too large", ["dataset.samples_per_task=5000"], None,
     ["dataset.samples_per_task=5000", "4000"]),
    ("task ids needed", ["method=finetune", f"method._target_={__name__}.TaskIdOnlyMethod"], None,
     ["TaskIdOnlyMethod", "dataset.scenario=mnist_rotations", "class_split"]),
    ("pathnet on a model it cannot read", ["method=pathnet", "model=pc_cnn"], None,
     ["PathNet", "model=PcCNN", "mlp, mlp_hat, alexnet"]),
    ("model input mismatch", ["dataset=sinusoid", "method=maml", "model=conv4"], None,
     ["model=Conv4", "(1,)"]),
    ("few-shot ways > classes", ["dataset=digits_fewshot", "method=maml", "model=conv4",
                                 "dataset.ways=12"], None, ["dataset.ways=12", "1..6"]),
    ("few-shot train_ways > classes", ["dataset=digits_fewshot", "method=protonet",
                                       "model=conv4", "dataset.train_ways=30"], None,
     ["dataset.train_ways=30", "24"]),
    ("data_dir missing", CIFAR, "missing", ["cifar-10-batches-py", "does not exist",
                                             "dataset.source.download=true"]),
    ("data_dir without the files", ["dataset/source=mnist"], _empty_dir,
     ["MNIST not found", "train-images-idx3-ubyte", "dataset.source.download=true"]),
    ("truncated pickle", CIFAR, _truncated_cifar, ["CIFAR-10", "corrupt"]),
    ("wrong array shape (CIFAR)", CIFAR, _wrong_shape_cifar, ["CIFAR-10", "corrupt"]),
    ("bad JPEG", ["dataset=tinyimagenet", "model=mlp"], _bad_jpeg_tiny,
     ["cannot read TinyImageNet image", ".JPEG"]),
    ("wrong array shape (MER)", ["dataset/source=mer"], _wrong_shape_mer,
     ["mnist_rotations.pt", "(5, 100)", "784"]),
    ("truncated torch file (MER)", ["dataset/source=mer"], _truncated_mer,
     ["mnist_rotations.pt", "corrupt"]),
    ("crafted torch file (MER)", ["dataset/source=mer"], _crafted_mer,
     ["refusing to load", "mnist_rotations.pt", "posix.system"]),
    ("resume without checkpoint", ["resume.path=true"], None,
     ["resume.path=true", "no checkpoint"]),
    ("retired source string", ["dataset.source=mnist"], None,
     ["dataset.source='mnist'", "dataset/source=<name>"]),
    ("scenario that cannot be imported", ["dataset.scenario._target_=metacl.data.spirals"], None,
     ["dataset.scenario._target_=metacl.data.spirals"]),
    # Trainer settings: every key works or is refused in one line (metacl.runner.trainer).
    ("trainer gradient clipping", ["+trainer.gradient_clip_val=1.0"], None,
     ["trainer.gradient_clip_val", "method.grad_clip_norm"]),
    ("trainer accumulation", ["+trainer.accumulate_grad_batches=2"], None,
     ["trainer.accumulate_grad_batches", "method.batch_size"]),
    ("trainer strategy", ["+trainer.strategy=ddp"], None, ["trainer.strategy", "launcher"]),
    ("two devices", ["trainer.devices=2"], None, ["trainer.devices=2", "1 or [k]"]),
    ("a GPU index on a CPU trainer", ["trainer=cpu", "trainer.devices=[0]"], None,
     ["trainer.devices=[0]", "accelerator=cpu"]),
    ("trainer callbacks", ["+trainer.callbacks=[]"], None, ["trainer.callbacks", "schedule"]),
    ("trainer logger", ["+trainer.logger=false"], None, ["trainer.logger", "logger="]),
    ("unknown trainer key", ["+trainer.warp_speed=9"], None,
     ["trainer.warp_speed", "max_epochs"]),
    ("unsupported precision", ["trainer.precision=16-mixed"], None,
     ["trainer.precision=16-mixed", "LaMAML", "32-true"]),
    ("bf16 with the compiled glance", ["method.compile=true", "trainer.precision=bf16-mixed"],
     None, ["trainer.precision=bf16-mixed", "LaMAML (method.compile=true)", "allowed: 32-true"]),
    ("bf16 with MER's compiled step",
     ["method=mer", "method.compile=true", "trainer.precision=bf16-mixed"], None,
     ["trainer.precision=bf16-mixed", "MER (method.compile=true)", "allowed: 32-true"]),
    # issue 17: values that used to end in a traceback or in a run of the wrong size
    ("seed not a number", ["seed=abc"], None, ["seed='abc'", "an integer"]),
    ("seed not an integer", ["seed=1.5"], None, ["seed=1.5", "an integer"]),
    ("unknown method key", ["+method.foo=1"], None,
     ["method.foo=1", "LaMAML", "allowed:", "glances", "opt_lr"]),
    ("unknown model key", ["+model.depth=3"], None, ["model.depth=3", "MLP", "hidden"]),
    ("infinite lr", ["method=er", "method.lr=inf"], None, ["method.lr=inf", "finite"]),
    ("negative checkpoint interval", ["checkpoint.every_n_steps=-1"], None,
     ["checkpoint.every_n_steps=-1", ">= 1"]),
    ("zero limit_tasks", ["dataset.limit_tasks=0"], None, ["dataset.limit_tasks=0", ">= 1"]),
    ("negative limit_tasks", ["dataset.limit_tasks=-1"], None,
     ["dataset.limit_tasks=-1", ">= 1"]),
    ("zero limit_train_per_task", ["dataset.limit_train_per_task=0"], None,
     ["dataset.limit_train_per_task=0", ">= 1"]),
    ("few-shot zero limit_tasks", ["dataset=digits_fewshot", "method=maml", "model=conv4",
                                   "dataset.limit_tasks=0"], None, ["dataset.limit_tasks=0"]),
    ("validation rounds to nothing", ["dataset.validation=0.0001"], None,
     ["dataset.validation=0.0001", "no sample", "fraction >="]),
    ("MNIST idx file truncated", ["dataset/source=mnist", "dataset.samples_per_task=10"],
     lambda tmp: _mnist(tmp, "truncated"), ["train-images-idx3-ubyte", "truncated"]),
    ("MNIST idx file empty", ["dataset/source=mnist", "dataset.samples_per_task=10"],
     lambda tmp: _mnist(tmp, "empty"), ["train-images-idx3-ubyte", "empty"]),
    ("MNIST idx file wrong magic", ["dataset/source=mnist", "dataset.samples_per_task=10"],
     lambda tmp: _mnist(tmp, "magic"), ["train-images-idx3-ubyte", "magic"]),
    ("MNIST labels of the wrong length", ["dataset/source=mnist", "dataset.samples_per_task=10"],
     lambda tmp: _mnist(tmp, "labels"), ["t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]),
    # Keys the composed config does not have: Hydra itself refuses them while composing, so these
    # rows ("cli") go through the real train.py, which must refuse them before Hydra starts.
    ("key the method does not have", ["method.lr=0.5"], "cli",
     ["method.lr", "LaMAML (method=lamaml) has no key 'lr'", "opt_lr", "+method.lr=0.5"]),
    ("key the model does not have", ["model.foo=1"], "cli",
     ["model.foo", "MLP (model=mlp) has no key 'foo'", "hidden, init", "+model.foo=1"]),
    ("key the dataset does not have", ["dataset.foo=1"], "cli",
     ["dataset.foo", "(dataset=mnist_rotations) has no key 'foo'", "n_tasks", "+dataset.foo=1"]),
    ("key an experiment's method does not have",
     ["experiment=baselines/er_cifar100_single_pass", "method.std_init=0.1"], "cli",
     ["method.std_init", "ER (method=er) has no key 'std_init'", "replay_batch_size"]),
    ("a search space named through its dotted key",
     ["hparams_search=er_optuna", "hydra.sweeper.params.method.lr=interval(0.01,0.1)"], "cli",
     ["'hydra.sweeper.params' has 'method.lr' as one key",
      "as an argument of its own: method.lr=interval(0.01,0.1)"]),
    ("deleting a key that is not there", ["~method.lr"], "cli",
     ["~method.lr", "no key 'lr' to delete", "opt_lr"]),
    ("a swept key that is not there", ["-m", "method.lr=0.1,0.3"], "cli",
     ["method.lr", "LaMAML (method=lamaml) has no key 'lr'", "+method.lr=0.1,0.3"]),
    ("a key one job's method does not have",
     ["-m", "method=er,finetune", "method.replay_batch_size=5"], "cli",
     ["method.replay_batch_size", "Finetune (method=finetune) has no key 'replay_batch_size'",
      "grad_clip_norm"]),
    # eval.py's key=value arguments over a run's stored config ("eval": the real eval.py on a
    # run trained by the real train.py); the run folder gets nothing, no eval-*.json either.
    ("eval: key the model does not have", ["model.foo=1"], "eval",
     ["model.foo", "MLP (model=mlp) has no key 'foo'", "hidden, init", "+model.foo=1"]),
    ("eval: added key the model does not take", ["+model.foo=1"], "eval",
     ["model.foo=1 is not a key of MLP", "allowed: dropout, hidden"]),
]


@pytest.fixture
def previous_run(tmp_path) -> Path:
    """An output folder that already holds another run's results (they must survive)."""
    out = tmp_path / "previous"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"status": "completed", "metrics": {"RA": 1}}))
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished run with its checkpoint, trained by train.py (so its config names Hydra's
    group choices, as eval.py finds them in a user's run)."""
    cwd = tmp_path_factory.mktemp("trained")
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", "method=er",
                          "logger=none", "trainer=cpu", "hydra.run.dir=run"], cwd=cwd,
                         env={**_env(), "METACL_ROOT_DIR": str(cwd)}, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return cwd / "run"


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_and_touches_nothing(compose, tmp_path, previous_run,
                                                          monkeypatch, capsys, request, row):
    _, overrides, data, fragments = row
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if data == "cli":
        _refused_by_train_py(tmp_path, previous_run, overrides, fragments)
        return
    if data == "eval":
        _refused_by_eval_py(tmp_path, request.getfixturevalue("trained_run"), overrides,
                            fragments)
        return
    extra = []
    if data == "missing":
        extra = [f"data_dir={tmp_path / 'nowhere'}"]
    elif data is not None:
        extra = [f"data_dir={data(tmp_path)}"]
    before = (previous_run / "results.json").read_text()
    listing = sorted(p.name for p in previous_run.iterdir())
    cfg = compose(["debug=fast", f"paths.output_dir={previous_run}", *overrides, *extra])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == EXIT_USER_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    assert (previous_run / "results.json").read_text() == before
    assert sorted(p.name for p in previous_run.iterdir()) == listing  # nothing new either
    assert not (tmp_path / "PAYLOAD_RAN").exists()  # a crafted data file ran no code


def test_output_folder_inside_a_file_is_refused_before_anything_is_written(compose, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = compose(["debug=fast", f"paths.output_dir={blocker / 'run'}"])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert f"paths.output_dir={blocker / 'run'}" in err and "not writable" in err


def test_shipped_configs_pass_validation(compose):
    """No false alarms: every method file's numbers, and experiment files covering every
    dataset/model pairing the project ships (composing all 60 would take a minute)."""
    from omegaconf import OmegaConf

    from metacl.validate import check_method_numbers, validate_config

    conf = ROOT / "conf"
    for method in sorted((conf / "method").glob("*.yaml")):
        check_method_numbers(OmegaConf.load(method))
    for name in ("lamaml/lamaml_cifar100_single_pass", "baselines/er_tinyimagenet_multi_pass",
                 "libcontinual/lucir_cifar100", "maml/miniimagenet_5w1s",
                 "maml/omniglot_20w5s", "maml/sinusoid_10shot", "maml/digits_5w1s_protonet"):
        cfg = compose([f"experiment={name}", "paths.output_dir=/tmp/metacl-unused"])
        assert validate_config(cfg) in ("continual", "episodic"), name


def test_wandb_without_network_goes_offline_with_a_message(monkeypatch, capsys):
    from metacl import loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # "logged in"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert loggers.resolve_wandb_mode("auto") == "offline"
    assert "offline" in capsys.readouterr().err


def _env() -> dict:
    """train.py in a child process imports this checkout's metacl (not an installed copy)."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _train_py(args, cwd):
    env = _env()
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _refused_by_train_py(tmp_path, previous_run, overrides, fragments):
    """train.py exits 2 with one `error:` line holding every fragment, before Hydra creates a
    run or sweep folder; the run already in the output folder is untouched."""
    before = (previous_run / "results.json").read_text()
    new = tmp_path / "new"
    flags = [o for o in overrides if o.startswith("-")]  # argparse: flags before overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    result = _train_py([*flags, "debug=fast", *overrides, f"hydra.run.dir={new}",
                        f"hydra.sweep.dir={new}", "paths.root_dir=."], tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not new.exists() and not (tmp_path / "outputs").exists()
    assert (previous_run / "results.json").read_text() == before


def _refused_by_eval_py(tmp_path, run, overrides, fragments):
    """eval.py exits 2 with one `error:` line holding every fragment; the run's files are
    unchanged and no eval-*.json is written."""
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"run={run}", *overrides],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == EXIT_USER_ERROR, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("overrides", [
    ["method=er", "method.lr=0.1"], ["+method.foo=1"], ["++method.lr=1"], ["~method.opt_lr"],
    ["hydra.run.dir=/tmp/metacl-unused", "hydra.job.chdir=false"],
    ["-m", "method.opt_lr=0.1,0.3"], ["-m", "method=er,finetune", "method.lr=choice(0.1)"],
    ["-m", "method=er,finetune", "method.lr=0.1,0.3", "seed=range(0,2)"],
    ["hparams_search=er_optuna", "method.replay_batch_size=choice(-1,10)",
     "hydra.sweeper.n_trials=6"],
    ["experiment=baselines/meta_bgd_cifar100_single_pass", "method.std_init=0.1"],
    ["--cfg", "job", "method=er", "method.lr=0.1"], ["method.lr=0.1", "method=er"],
    ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
    ["dataset/source=mnist", "dataset.source.download=true"],
], ids=" ".join)
def test_valid_overrides_pass_the_key_check(overrides):
    from metacl.cli import unknown_key

    assert unknown_key(overrides, ROOT / "conf") is None


def test_cli_unknown_option_and_bad_value_exit_2_with_one_line(tmp_path, previous_run):
    before = (previous_run / "results.json").read_text()
    unknown = _train_py(["method=lamaml2", f"hydra.run.dir={previous_run}"], tmp_path)
    assert unknown.returncode == EXIT_USER_ERROR
    assert unknown.stderr.strip().splitlines() == [unknown.stderr.strip()]  # one line
    assert "method=lamaml2" in unknown.stderr and "lamaml, " in unknown.stderr
    # A nested group's option (dataset/source) is named with its own options, no others.
    source = _train_py(["dataset/source=floppy", f"hydra.run.dir={previous_run}"], tmp_path)
    assert source.returncode == EXIT_USER_ERROR
    assert source.stderr.strip().splitlines() == [source.stderr.strip()]
    assert "dataset/source=floppy" in source.stderr and "bundled, cifar10, " in source.stderr
    dataset = _train_py(["dataset=floppy", f"hydra.run.dir={previous_run}"], tmp_path)
    assert "cifar10, " in dataset.stderr and "source/" not in dataset.stderr
    bad = _train_py(["debug=fast", "method=er", "method.lr=-1", f"hydra.run.dir={previous_run}"],
                    tmp_path)
    assert bad.returncode == EXIT_USER_ERROR and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: method.lr=-1")
    assert (previous_run / "results.json").read_text() == before
    assert not (tmp_path / "outputs").exists()  # no stray run folder either


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_one_line_and_touches_nothing(compose, previous_run, monkeypatch,
                                                            capsys, damage):
    from metacl import checkpoint

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    ckpt = previous_run / "checkpoints" / checkpoint.BOUNDARY_FILE
    ckpt.parent.mkdir()
    if damage == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save({"format": checkpoint.FORMAT_VERSION, "weights": torch.zeros(1000)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
    listing = sorted(p.name for p in previous_run.rglob("*"))
    before = ckpt.read_bytes()
    cfg = compose(["debug=fast", f"paths.output_dir={previous_run}",
                   f"resume.path={previous_run}"])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == EXIT_USER_ERROR
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {ckpt}")
    assert ("0 bytes" if damage == "empty" else "truncated") in lines[0]
    assert sorted(p.name for p in previous_run.rglob("*")) == listing
    assert ckpt.read_bytes() == before


# ------------------------------------------------------------------ runs that end early (issue 17)
def test_a_diverged_single_run_is_one_line_and_status_diverged(compose, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose(["debug=fast", "method=er", "method.lr=1e30", f"paths.output_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: the run diverged: training loss became nan in task 0")
    assert "status: diverged" in lines[-1] and "method.lr" in lines[-1]
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "diverged"


def test_ctrl_c_before_the_stop_handler_is_one_line(compose, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the data are built (before the loop takes over SIGINT): no traceback."""
    from metacl.data.datamodule import ContinualDataModule

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(ContinualDataModule, "build", interrupted)
    cfg = compose(["debug=fast", f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == ("stopped: interrupted by Ctrl-C before any checkpoint was saved; "
                           "nothing to resume")


@pytest.mark.parametrize("save", [True, False])
def test_ctrl_c_prints_a_resume_hint_only_with_checkpoints(compose, tmp_path, capsys,
                                                           monkeypatch, save):
    import signal

    from metacl.runner.callbacks import InTaskCheckpoints

    original = InTaskCheckpoints.__call__

    def call(self, stream, trainer, pl_module, batch_idx):
        if stream.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, stream, trainer, pl_module, batch_idx)

    monkeypatch.setattr(InTaskCheckpoints, "__call__", call)
    out = tmp_path / "run"
    cfg = compose(["debug=fast", "method=er", f"paths.output_dir={out}",
                   f"save_checkpoints={str(save).lower()}"])
    with pytest.raises(SystemExit) as exited:
        run_with_clean_errors(run_main, cfg)
    assert exited.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("resume=" in err) == save  # the hint: python train.py ... resume=<dir>
    assert (out / "checkpoints").exists() == save
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "interrupted"
    if not save:
        assert "save_checkpoints=false" in err.strip().splitlines()[-1]


def test_ctrl_c_in_the_first_second_is_one_line(tmp_path):
    """SIGINT while train.py still imports: one line, exit 130, no KeyboardInterrupt trace."""
    import signal
    import time

    env = _env()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "debug=fast", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1].startswith("stopped: interrupted by Ctrl-C")


def test_ctrl_c_between_multirun_jobs_is_one_line():
    """After a multirun job, Ctrl-C while Hydra composes the next one: one line, exit 130.
    (A stand-in process: the gap between two jobs is too short to hit from outside.)"""
    from metacl.cli import BETWEEN_JOBS_CTRL_C

    probe = ("import os, signal, time\n"
             "from metacl.cli import ctrl_c_between_jobs\n"
             "print('job 0 done', flush=True)\n"
             "ctrl_c_between_jobs()\n"
             "os.kill(os.getpid(), signal.SIGINT)\n"
             "time.sleep(10)\n"
             "print('the next job ran')\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=_env(), timeout=60, check=False)
    assert proc.returncode == 130
    assert proc.stdout == "job 0 done\n"
    assert proc.stderr.strip().splitlines() == [BETWEEN_JOBS_CTRL_C]


def test_a_multirun_job_leaves_the_between_jobs_handler_and_a_single_run_does_not(
        tmp_path, monkeypatch):
    """train.py's task function sets the between-jobs handler after a multirun job only
    (train.py run in this process, as `python train.py ...` runs it)."""
    from tests.conftest import train_in_this_process

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    common = ["debug=fast", "logger=none", "dataset.limit_tasks=1"]
    for args, handler in ((["-m", f"hydra.sweep.dir={tmp_path / 'm'}"], "stop"),
                          ([f"hydra.run.dir={tmp_path / 'r'}"], "default_int_handler")):
        assert train_in_this_process([*args, *common], monkeypatch).__name__ == handler
    assert len(list((tmp_path / "m").glob("*/results.json"))) == 1
    assert (tmp_path / "r" / "results.json").is_file()


def test_unwritable_output_folder_is_refused_before_hydra_creates_it(tmp_path, monkeypatch):
    from metacl.cli import unwritable_output

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    problem = unwritable_output([f"hydra.run.dir={blocker / 'run'}"])
    assert problem.startswith(f"hydra.run.dir={blocker / 'run'} cannot be created")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    problem = unwritable_output(["-m", "seed=1,2", f"hydra.sweep.dir={locked / 'sweep'}"])
    assert problem.startswith(f"hydra.sweep.dir={locked / 'sweep'} is not writable")
    monkeypatch.chdir(locked)  # the default outputs/ folder, under the current one
    assert f"{locked / 'outputs'} is not writable" in unwritable_output(["seed=1"])
    assert unwritable_output([f"hydra.run.dir={tmp_path / 'fine' / 'run'}"]) is None
    monkeypatch.chdir(tmp_path)
    assert unwritable_output([f"hydra.run.dir={locked}/x", "-m"]) is None  # run.dir unused


def test_cli_unwritable_output_and_long_multirun_folder(tmp_path):
    """A read-only place is one line from train.py (exit 2, nothing created); a multirun job
    whose overrides make a folder name over 255 bytes gets a shortened, hashed name and keeps
    its full overrides in .hydra/."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused = _train_py(["debug=fast", f"hydra.run.dir={blocker / 'run'}"], tmp_path)
    assert refused.returncode == EXIT_USER_ERROR and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        (f"error: hydra.run.dir={blocker / 'run'} cannot be created: {blocker} is a file; "
         "allowed: a folder you can write to, e.g. hydra.run.dir=<dir>")]
    long_name = "t" * 300
    sweep = tmp_path / "sweep"
    done = _train_py(["-m", "debug=fast", "method=er", "dataset.limit_train_per_task=10",
                      f"task_name={long_name}", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(job.name.encode()) <= 200 and job.name.startswith("0_dataset.limit_train")
    assert json.loads((job / "results.json").read_text())["status"] == "completed"
    assert f"task_name={long_name}" in (job / ".hydra" / "overrides.yaml").read_text()
