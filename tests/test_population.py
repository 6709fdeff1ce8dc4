"""Population runs (hydra/launcher=population): members trained together equal their
separate runs; grouping rules; the launcher end to end."""

import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from metacl.errors import ConfigError
from metacl.population.grouping import group_jobs
from metacl.population.members import MemberRandom
from tests.conftest import ROOT, compose_cfg, train_in_this_process

# Small streams: task 0 gives 50 incoming batches of 10, then 6 batches of task 1 (a task
# switch with a full memory of 200 samples).
STREAM = ["dataset.limit_tasks=2", "dataset.limit_train_per_task=500",
          "dataset.limit_test_per_task=20", "logger=none"]
BATCHES = (50, 6)


def build(overrides: list[str], dtype=torch.float32):
    """A member as the runner prepares a run: seed, data, backbone, method."""
    cfg = compose_cfg([*STREAM, *overrides])
    pl.seed_everything(cfg.seed, verbose=False)
    dm = instantiate(cfg.dataset).build()
    info = dm.task_info
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, task_info=info)
    method.to(dtype)
    method.optimizers = lambda: method.optimizer  # observe() without a Trainer
    method.manual_backward = lambda loss: loss.backward()
    dm.batch_size = method.batch_size
    return method, dm


def batches_of(dm, t, n, dtype):
    dm.set_task(t)
    for i, batch in enumerate(dm.train_dataloader()):
        if i == n:
            return
        x, y, tt = dm.on_after_batch_transfer(batch, 0)
        yield x.to(dtype), y, tt


def separate(overrides, dtype, stream=BATCHES, initial=None):
    """The separate run; `initial` (a dict) receives its state before training."""
    method, dm = build(overrides, dtype)
    if initial is not None:
        initial.update(state(method))
    for t, n in enumerate(stream):
        method.before_task(t, dm)
        for batch in batches_of(dm, t, n, dtype):
            method.observe(*batch)
    return method


def together(member_overrides, dtype, stream=BATCHES):
    members, dms, randoms = [], [], []
    for overrides in member_overrides:
        method, dm = build(overrides, dtype)
        members.append(method)
        dms.append(dm)
        randoms.append(MemberRandom(torch.device("cpu")))
    for t, n in enumerate(stream):
        streams = []
        for m, dm, r in zip(members, dms, randoms):
            with r.full():
                m.before_task(t, dm)
                dm.set_task(t)
                streams.append(iter(dm.train_dataloader()))
        pop = type(members[0]).population_class(members)
        for _ in range(n):
            batches = []
            for dm, it, r in zip(dms, streams, randoms):
                with r:
                    x, y, tt = dm.on_after_batch_transfer(next(it), 0)
                batches.append((x.to(dtype), y, tt))
            pop.observe(batches, randoms, 0)
        pop.write_back()
    return members


def state(method) -> dict:
    return {k: v.detach().double().clone() for k, v in method.state_dict().items()
            if v.is_floating_point()}


MEMBERS = {  # each population has a member with other float hyperparameters
    "er": [["method=er", "seed=0"], ["method=er", "seed=1", "method.lr=0.05"]],
    "finetune": [["method=finetune", "seed=0"], ["method=finetune", "seed=1",
                                                  "method.lr=0.2"]],
    "lamaml": [["seed=0"], ["seed=1", "method.opt_lr=0.1", "method.alpha_init=0.1"]],
    "cmaml": [["method=cmaml", "seed=0"], ["method=cmaml", "seed=1", "method.opt_wt=0.05"]],
    "sync_lamaml": [["method=sync_lamaml", "seed=0"],
                    ["method=sync_lamaml", "seed=1", "method.opt_lr=0.2"]],
    "la_er": [["method=la_er", "seed=0"], ["method=la_er", "seed=1", "method.opt_lr=0.2"]],
    # the general (vmapped) glance: La-MAML with inner chunks, as its CIFAR settings
    "lamaml_chunks": [["seed=0", "method.inner_batches=2"],
                      ["seed=1", "method.inner_batches=2", "method.opt_lr=0.1"]],
    # class-split stream: per-member class orders and task masks
    "lamaml_split": [["dataset=mnist2_bundled", "seed=0"],
                     ["dataset=mnist2_bundled", "seed=1", "method.opt_lr=0.1"]],
}


# The hand-written MLP glance batched over members rounds differently from a single run's in
# float32 (~1e-7 per batch; in float64 it is bit-identical here). Float32 La-MAML runs are
# chaotic: a separate run whose first-layer weights are scaled by 1 + 1e-7 differs from the
# unscaled one by 5e-6 after one batch of the class-split stream and by 1.1 (relative) after
# seven (ReLU units and relu(alpha) switching). So float32 is compared over a short stream
# here, float64 over the whole one, and a population of one bit for bit.
BATCHED_MLP_GLANCE = {"lamaml", "cmaml", "sync_lamaml", "lamaml_split"}
SHORT = (2, 0)


@pytest.mark.parametrize("name", sorted(MEMBERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_members_trained_together_equal_their_separate_runs(name, dtype, tol):
    overrides = MEMBERS[name]
    stream = BATCHES
    if dtype == torch.float32 and name in BATCHED_MLP_GLANCE:
        stream = (1, 0) if name == "lamaml_split" else SHORT  # the split stream: fastest chaos
    pop = together(overrides, dtype, stream)
    for member, ov in zip(pop, overrides):
        initial = {}
        alone = separate(ov, dtype, stream, initial)
        a, b = state(alone), state(member)
        assert a.keys() == b.keys()
        moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
        assert moved > 1e-3, "training changed nothing: the comparison would be empty"
        for k in a:
            err = float((a[k] - b[k]).abs().max() / (a[k].abs().max() + 1e-12))
            assert err <= tol, f"{name} {ov}: {k} differs by {err:.2e} (relative)"


@pytest.mark.parametrize("name", ["lamaml", "cmaml", "lamaml_split"])
def test_a_population_of_one_is_bit_identical_to_the_separate_run(name):
    overrides = MEMBERS[name][0]
    a, b = state(separate(overrides, torch.float32)), \
        state(together([overrides], torch.float32)[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_member_with_other_hyperparameters_really_trains_differently():
    base, other = separate(["method=er", "seed=0"], torch.float64), \
        separate(["method=er", "seed=0", "method.lr=0.05"], torch.float64)
    a, b = state(base), state(other)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3


# ------------------------------------------------------------------------------ grouping
def cfgs(*override_lists):
    out = []
    for i, ov in enumerate(override_lists):
        cfg = compose_cfg(list(ov))
        out.append(cfg)
    return out


def test_seeds_and_declared_float_keys_group_together():
    groups = group_jobs(cfgs(["seed=0"], ["seed=1", "method.opt_lr=0.1"],
                             ["seed=2", "method.alpha_init=0.2", "method.opt_wt=0.3"]), 8)
    assert [g.jobs for g in groups] == [[0, 1, 2]]
    assert groups[0].keys == ["seed", "method.alpha_init", "method.opt_lr", "method.opt_wt"]


@pytest.mark.parametrize("other", [
    ["method.glances=3"],  # an integer hyperparameter
    ["method.learn_lr=false"],  # a boolean
    ["dataset=mnist_permutations"],
    ["model.hidden=[50,50]"],
    ["method=er"],
    ["trainer.max_epochs=2"],
])
def test_any_other_difference_is_another_group(other):
    groups = group_jobs(cfgs(["seed=0"], ["seed=1"], ["seed=2", *other]), 8)
    assert sorted(g.jobs for g in groups) == [[0, 1], [2]]
    assert groups[-1].why_alone


def test_methods_without_a_population_train_alone_and_say_why():
    groups = group_jobs(cfgs(["method=gem", "seed=0"], ["method=gem", "seed=1"]), 8)
    assert [g.jobs for g in groups] == [[0], [1]]
    assert all("GEM has no population implementation" in g.why_alone for g in groups)


def test_max_members_splits_groups_and_must_be_a_positive_whole_number():
    configs = cfgs(*[[f"seed={s}"] for s in range(5)])
    assert [g.jobs for g in group_jobs(configs, 2)] == [[0, 1], [2, 3], [4]]
    for bad in (0, -1, 1.5, "x"):
        with pytest.raises(ConfigError, match="max_members"):
            group_jobs(configs, bad)


# ------------------------------------------------------------------------------ end to end
def train(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=600)


def test_an_optuna_search_trains_each_batch_of_trials_as_a_population(tmp_path):
    """hydra.sweeper.n_jobs=3: the sweeper hands the launcher 3 trials at a time; trials that
    differ only in a population key (ER's lr) train as one program, and the search still reads
    every trial's value."""
    import yaml

    run = train(["hparams_search=er_optuna", "hydra.sweeper.n_jobs=3", "hydra.sweeper.n_trials=6",
                 "hydra.sweeper.storage=null", "method.replay_batch_size=10", "debug=fast",
                 "hydra/launcher=population", "hydra.sweep.dir=search"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("population of 3 jobs") == 2, run.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "search").glob("*/results.json")]
    assert len(results) == 6 and all(r["status"] == "completed" for r in results)
    assert sorted(r["population"]["index"] for r in results) == [0, 0, 1, 1, 2, 2]
    best = yaml.safe_load((tmp_path / "search" / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["validation"]["metrics"]["RA"] for r in results)
    assert best["trials"] == {"complete": 6, "fail": 0}


def test_population_sweep_writes_each_jobs_own_run_equal_to_the_separate_runs(tmp_path,
                                                                             monkeypatch):
    common = ["-m", "seed=0,1", "method=er", "debug=fast", "logger=none"]
    pop = train([*common, "hydra/launcher=population", "hydra.sweep.dir=pop"], tmp_path)
    assert pop.returncode == 0, pop.stderr[-3000:]
    assert "population of 2 jobs" in pop.stderr
    monkeypatch.chdir(tmp_path)
    train_in_this_process([*common, "hydra.sweep.dir=alone"], monkeypatch)  # the basic launcher
    for k in range(2):
        name = f"{k}_method=er,seed={k}"
        a = json.loads((tmp_path / "alone" / name / "results.json").read_text())
        p = json.loads((tmp_path / "pop" / name / "results.json").read_text())
        assert p["status"] == "completed"
        assert p["population"] == {"members": 2, "index": k}
        assert p["accuracy_matrix"] == a["accuracy_matrix"]
        assert (tmp_path / "pop" / name / "checkpoints" / "last.ckpt").exists()
        assert (tmp_path / "pop" / name / ".hydra" / "config.yaml").exists()


def test_a_group_split_over_processes_stops_and_resumes_to_the_uninterrupted_runs(tmp_path):
    """hydra.launcher.processes=2: 4 ER seeds train as two populations of 2 in two forked
    processes. SIGTERM to the launcher: it forwards the signal, its processes save and stop,
    and it exits as a stopped run (143). resume=true finishes them, with the matrices of the
    same command run without a stop (float32 populations round differently from separate
    runs over long runs: docs/sweeps.md)."""
    import signal
    import time

    common = ["-m", "seed=0,1,2,3", "method=er", "debug=fast", "dataset.limit_tasks=2",
              "dataset.limit_train_per_task=600", "logger=none", "hydra/launcher=population",
              "hydra.launcher.processes=2"]
    pop = [*common, "hydra.sweep.dir=pop"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *pop], cwd=tmp_path,
                            env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (len(list((tmp_path / "pop").glob("*/results.json"))) < 4
           and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.05)
    time.sleep(1.0)  # inside the first task
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("population of 2 jobs") == 2 and "in process" in err, err[-3000:]
    stopped = [json.loads(p.read_text())["status"]
               for p in (tmp_path / "pop").glob("*/results.json")]
    assert len(stopped) == 4 and "interrupted" in stopped, stopped
    assert set(stopped) <= {"interrupted", "completed"}  # none left "running"
    resumed = train([*pop, "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    whole = train([*common, "hydra.sweep.dir=whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for k in range(4):
        name = f"{k}_dataset.limit_tasks=2,dataset.limit_train_per_task=600,method=er,seed={k}"
        w = json.loads((tmp_path / "whole" / name / "results.json").read_text())
        p = json.loads((tmp_path / "pop" / name / "results.json").read_text())
        assert p["status"] == w["status"] == "completed"
        assert p["population"] == w["population"] == {"members": 2, "index": k % 2,
                                                      "processes": 2}
        assert p["accuracy_matrix"] == w["accuracy_matrix"], k


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR2"])
def test_a_stop_signal_reaches_every_process_and_sigusr2_then_requeues(tmp_path, monkeypatch,
                                                                      signame):
    """The launcher's side of a stop, with each process's training replaced by a stand-in
    that marks its start, waits, and on SIGTERM saves (a marker) and exits as a stopped run.
    The signal to the launcher reaches every process as SIGTERM; the launcher waits for them,
    then exits 143, or on SIGUSR2 hands over to the handler that was there before it (under
    SLURM, submitit's: requeue this job), which sees every process's save."""
    import signal
    import threading
    import time
    from types import SimpleNamespace

    from metacl.population import launch

    def stand_in(launcher, configs, group, jobs, initial_job_idx, processes):
        def saved(signum, frame):
            (tmp_path / f"saved-{jobs[0]}").write_text(str(signum))
            sys.exit(143)

        signal.signal(signal.SIGTERM, saved)
        (tmp_path / f"started-{jobs[0]}").write_text(str(os.getpid()))
        time.sleep(60)
        return []

    monkeypatch.setattr(launch, "train_group", stand_in)
    handed_over = []

    def submitit_handler(signum, frame):  # what submitit's checkpoint-and-requeue ends in
        handed_over.append((signum, sorted(f.name for f in tmp_path.glob("saved-*"))))
        raise SystemExit(-1)

    def stop_when_started():
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), getattr(signal, signame))

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    stopper = threading.Thread(target=stop_when_started)
    try:
        stopper.start()
        with pytest.raises(SystemExit) as stopped:
            launch.train_in_processes(None, [None] * 4, SimpleNamespace(jobs=[0, 1, 2, 3]),
                                      2, 0)
        after = {s: signal.getsignal(s) for s in before}
    finally:
        stopper.join()
        signal.signal(signal.SIGUSR2, previous)
    started = sorted(f.name for f in tmp_path.glob("started-*"))
    assert started == ["started-0", "started-2"]  # two processes, jobs 0-1 and 2-3
    saves = {f.name: f.read_text() for f in tmp_path.glob("saved-*")}
    assert saves == {"saved-0": str(int(signal.SIGTERM)), "saved-2": str(int(signal.SIGTERM))}
    if signame == "SIGUSR2":
        assert handed_over == [(signal.SIGUSR2, ["saved-0", "saved-2"])]
        assert stopped.value.code == -1
    else:
        assert handed_over == [] and stopped.value.code == 128 + signal.SIGTERM
    assert after == before  # the launcher's forwarding handlers are gone


def test_processes_auto_and_bad_values(compose):
    from metacl.population.launch import group_processes, usable_cores

    cpu = [compose(["trainer=cpu"])] * 8
    cores = usable_cores()
    assert group_processes("auto", cpu) == min(cores, 4)  # at least two members each
    assert group_processes("auto", cpu[:3]) == 1
    assert group_processes(3, cpu) == 3 and group_processes(3, cpu[:2]) == 2
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ConfigError, match=f"hydra.launcher.processes={bad}: allowed: auto"):
            group_processes(bad, cpu)


def test_a_diverging_member_is_marked_and_the_others_complete(tmp_path):
    run = train(["-m", "seed=0,1", "method=er", "method.lr=0.1,1e30", "debug=fast",
                 "dataset.limit_train_per_task=600", "hydra/launcher=population",
                 "hydra.sweep.dir=pop"], tmp_path)
    statuses = {p.parent.name: json.loads(p.read_text())["status"]
                for p in (tmp_path / "pop").rglob("results.json")}
    assert sorted(statuses.values()) == ["completed", "completed", "diverged", "diverged"], \
        run.stderr[-3000:]
    assert all(s == "diverged" for n, s in statuses.items() if "1e30" in n)
    assert run.returncode == 1  # the summary table names the failed jobs


def test_bad_max_members_is_one_line(tmp_path):
    run = train(["-m", "seed=0,1", "debug=fast", "hydra/launcher=population",
                 "hydra.launcher.max_members=0", "hydra.sweep.dir=pop"], tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: hydra.launcher.max_members=0")
    assert not list((tmp_path / "pop").rglob("results.json"))


# ------------------------------------------------------------------------------ stop, resume
def prepared_members(tmp_path, seeds, extra=()):
    import time

    from metacl.population.members import Member
    from metacl.runner.folder import FolderLock
    from metacl.runner.main import prepare_loop

    members = []
    for k, seed in enumerate(seeds):
        cfg = compose_cfg(["method=er", "dataset.limit_tasks=3", "dataset.limit_train_per_task=60",
                           "dataset.limit_test_per_task=30", "logger=none", "trainer=cpu",
                           f"seed={seed}", f"paths.output_dir={tmp_path / str(k)}", *extra])
        out = tmp_path / str(k)
        lock = FolderLock(out)
        loop = prepare_loop(cfg, out, time.perf_counter(), lock)
        members.append(Member(index=k, hydra_cfg=None, ret=None, loop=loop, lock=lock,
                              random=MemberRandom(loop.session.device)))
    return members


def run_population(members):
    from metacl.population.loop import PopulationLoop

    try:
        PopulationLoop(members).run()
    finally:
        for m in members:
            m.lock.release()


def test_members_that_do_not_fit_fail_with_one_line_naming_max_members(tmp_path, monkeypatch,
                                                                        capsys):
    """Out of memory in a population step (on a GPU: torch.OutOfMemoryError): every member
    fails with one line that says how many trained together and which max_members halves the
    groups, instead of CUDA's allocator report."""
    from metacl.methods.population import SGDPopulation

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB ...")

    monkeypatch.setattr(SGDPopulation, "observe", no_memory)
    members = prepared_members(tmp_path, [0, 1, 2, 3])
    run_population(members)
    for k in range(4):
        result = json.loads((tmp_path / str(k) / "results.json").read_text())
        line = ("RuntimeError: out of memory training 4 members together; "
                "hydra.launcher.max_members=2 trains at most 2 at once")
        assert result["error"] == line and result["status"] == f"failed: {line}"
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("population member")]
    assert len(said) == 4 and all(x.endswith(f" failed: {line}") for x in said), said


def test_members_that_do_not_fit_train_again_in_halves_from_their_checkpoints(
        tmp_path, monkeypatch, capsys):
    """A device that holds 2 members but not 4: the 4-member population runs out of memory
    inside its second task (tasks of 6 batches: the 9th step); the launcher trains the members
    again in two populations of 2, each member resumed from its last checkpoint (the end of
    the first task), and they end with the matrices of the same command with max_members=2
    from the start. (Out of memory at the first step resumes from the checkpoint every run
    saves before its first task, the same way.)"""
    fails_at = 9
    from metacl.methods.population import SGDPopulation

    real = SGDPopulation.observe
    calls = {"n": 0}

    def observe(self, *args, **kwargs):
        if len(self.members) > 2:
            calls["n"] += 1
            if calls["n"] == fails_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SGDPopulation, "observe", observe)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    common = ["-m", "seed=0,1,2,3", "method=er", "debug=fast", "dataset.limit_tasks=2",
              "dataset.limit_train_per_task=60", "logger=none", "hydra/launcher=population",
              "hydra.launcher.processes=1"]
    train_in_this_process([*common, "hydra.sweep.dir=retried"], monkeypatch)
    said = "".join(capsys.readouterr())
    train_in_this_process([*common, "hydra.launcher.max_members=2", "hydra.sweep.dir=two"],
                          monkeypatch)
    err = capsys.readouterr().err
    assert calls["n"] == fails_at  # only the population of 4 ran out of memory
    assert ("out of memory with 4 members together: training them again in groups of at "
            "most 2, each from its last checkpoint") in said, said[-3000:]
    assert said.count("population of 2 jobs") == 2 and "resuming" in said, said[-3000:]
    assert "out of memory" not in err
    for k in range(4):
        name = f"{k}_dataset.limit_tasks=2,dataset.limit_train_per_task=60,method=er,seed={k}"
        r, t = (json.loads((tmp_path / d / name / "results.json").read_text())
                for d in ("retried", "two"))
        assert r["status"] == t["status"] == "completed"
        assert r["population"] == t["population"] == {"members": 2, "index": k % 2}
        assert r["accuracy_matrix"] == t["accuracy_matrix"], k


# (method, the observe call that sends SIGTERM, the step checkpoint's position (task, epoch,
# batch), the steps the resumed population makes): tasks of 6 batches, 3 tasks, 1 epoch.
STOPS = [("er", 9, (1, 0, 3), 9), ("lamaml", 9, (1, 0, 3), 9),
         ("er", 6, (0, 1, 0), 12)]  # the last batch of task 0: resumes at its end


@pytest.mark.parametrize("method,stop,position,remaining", STOPS)
def test_a_population_stopped_inside_a_task_resumes_there_to_the_uninterrupted_matrices(
        tmp_path, monkeypatch, method, stop, position, remaining):
    """SIGTERM at a step between two step checkpoints: every member saves its step.ckpt
    there, exactly as its separate run would; the resumed population goes on from that batch
    and ends with the uninterrupted population's matrices, which are the separate runs'
    (test above)."""
    import os
    import signal

    import torch

    from metacl.checkpoint import Interrupted

    extra = [f"method={method}", "checkpoint.every_n_steps=4"]
    population_class = _population_class(method)
    run_population(prepared_members(tmp_path / "whole", [0, 1], extra))
    calls = {"n": 0}
    observe = population_class.observe

    def stop_in_task_1(self, *args):
        calls["n"] += 1
        if calls["n"] == stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return observe(self, *args)

    monkeypatch.setattr(population_class, "observe", stop_in_task_1)
    with pytest.raises(Interrupted):
        run_population(prepared_members(tmp_path / "cut", [0, 1], extra))
    monkeypatch.setattr(population_class, "observe", observe)
    for k in range(2):
        cut = json.loads((tmp_path / "cut" / str(k) / "results.json").read_text())
        assert cut["status"] == "interrupted"
        assert len(cut["accuracy_matrix"]) == position[0]  # rows of the finished tasks
        step = torch.load(tmp_path / "cut" / str(k) / "checkpoints" / "step.ckpt",
                          weights_only=True)
        assert step["step"] == stop
        assert tuple(step["position"][key] for key in ("task", "epoch", "batch")) == position
    calls["n"] = 0

    def count(self, *args):
        calls["n"] += 1
        return observe(self, *args)

    monkeypatch.setattr(population_class, "observe", count)
    run_population(prepared_members(tmp_path / "cut", [0, 1], [*extra, "resume=true"]))
    assert calls["n"] == remaining  # together, from the saved batch (not the task's start)
    for k in range(2):
        whole = json.loads((tmp_path / "whole" / str(k) / "results.json").read_text())
        resumed = json.loads((tmp_path / "cut" / str(k) / "results.json").read_text())
        assert resumed["status"] == "completed"
        assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
        assert resumed["population"] == {"members": 2, "index": k}


def _population_class(method: str):
    from metacl.methods.population import SGDPopulation

    if method == "er":
        return SGDPopulation
    from metacl.methods.lamaml_population import LaMAMLPopulation

    return LaMAMLPopulation


# ------------------------------------------------------------------------------ few-shot
# Seed populations of MAML, FOMAML and ProtoNet (metacl.fewshot.population): 10 meta-batches
# of members trained together equal their separate runs (MetaLearner.training_step, as the
# Trainer calls it). Conv4 on the CPU: the method's per-task loop (each member's own
# meta_step, bit-identical gradients); MLPs: vmap over members around the per-task vmap.
FEW_SHOT = ["dataset=digits_fewshot", "model=conv4", "model.channels=8", "logger=none",
            "method.meta_batch_size=3", "dataset.query=3"]
SINUSOID = ["dataset=sinusoid", "model=mlp", "model.hidden=[20,20]", "logger=none",
            "method.meta_batch_size=4"]
META_BATCHES = 10
FEW_SHOT_MEMBERS = {  # name: (overrides shared by the members, vmapped population)
    # clipping by value that bites (per member) and a StepLR halving every 4 meta-batches
    "maml": ([*FEW_SHOT, "method=maml", "method.meta_grad_clip=0.05", "method.lr_step=4"],
             False),
    "fomaml": ([*FEW_SHOT, "method=fomaml", "method.inner_steps=2"], False),
    "protonet": ([*FEW_SHOT, "method=protonet", "method.lr_step=4", "dataset.train_ways=7"],
                 False),
    "maml_vmap": ([*SINUSOID, "method=maml", "method.meta_grad_clip=0.5"], True),
    "fomaml_vmap": ([*SINUSOID, "method=fomaml", "method.lr_step=4"], True),
    "protonet_vmap": (["dataset=digits_fewshot", "model=mlp", "model.hidden=[32,32]",
                       "logger=none", "dataset.query=3", "method=protonet",
                       "method.vectorize=vmap", "method.meta_batch_size=2"], True),
}


def build_learner(overrides: list[str], dtype):
    """A few-shot member as the runner prepares one (seed, data, backbone, method)."""
    cfg = compose_cfg(overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    dm = instantiate(cfg.dataset).build()
    info = dm.episode_info
    backbone = instantiate(cfg.model, input_shape=info.input_shape, n_outputs=info.n_outputs)
    method = instantiate(cfg.method, _partial_=True)(backbone=backbone, episode_info=info)
    method.to(dtype)
    found = method.configure_optimizers()
    opt, scheds = (found, []) if isinstance(found, torch.optim.Optimizer) else \
        (found[0][0], found[1])
    method.optimizers = lambda: opt  # training_step without a Trainer
    method.lr_schedulers = lambda: scheds[0] if scheds else None
    dm.meta_batch_size = method.meta_batch_size
    return method, dm


def meta_batch(dm, dtype):
    episodes = dm.draw_train(dm.meta_batch_size)
    return type(episodes)(*(t.to(dtype) if t.is_floating_point() else t for t in episodes))


def learner_separate(overrides, dtype):
    method, dm = build_learner(overrides, dtype)
    for i in range(META_BATCHES):
        method.training_step(meta_batch(dm, dtype), i)
    return method


def learners_together(member_overrides, dtype, vmapped):
    built = [build_learner(ov, dtype) for ov in member_overrides]
    members = [m for m, _ in built]
    randoms = [MemberRandom(torch.device("cpu")) for _ in members]
    pop = type(members[0]).population_class(members)
    assert pop.vmapped == vmapped
    for _ in range(META_BATCHES):
        batches = []
        for (_, dm), r in zip(built, randoms):
            with r:
                batches.append(meta_batch(dm, dtype))
        losses = pop.observe(batches, randoms, 0)
        assert losses.shape == (len(members),) and bool(torch.isfinite(losses).all())
    pop.write_back()
    return members


def optimizer_tensors(method) -> dict:
    """Adam's state and the learning rate, by parameter position (a checkpoint's view)."""
    state = method.optimizers().state_dict()
    out = {f"opt.{i}.{k}": v.detach().double().reshape(-1) for i, s in state["state"].items()
           for k, v in s.items()}
    out["lr"] = torch.tensor([state["param_groups"][0]["lr"]], dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", sorted(FEW_SHOT_MEMBERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=["float32", "float64"])
def test_few_shot_members_trained_together_equal_their_separate_runs(name, dtype, tol):
    common, vmapped = FEW_SHOT_MEMBERS[name]
    overrides = [[*common, "seed=0"], [*common, "seed=1"]]
    pop = learners_together(overrides, dtype, vmapped)
    first = None
    for member, ov in zip(pop, overrides):
        alone = learner_separate(ov, dtype)
        a, b = state(alone), state(member)
        assert a.keys() == b.keys()
        initial = state(build_learner(ov, dtype)[0])
        moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
        assert moved > 1e-3, "training changed nothing: the comparison would be empty"
        oa, ob = optimizer_tensors(alone), optimizer_tensors(member)
        assert oa.keys() == ob.keys() and len(oa) > 1
        for k in [*a, *oa]:
            x, y = (a[k], b[k]) if k in a else (oa[k], ob[k])
            err = float((x - y).abs().max() / (x.abs().max() + 1e-12))
            assert err <= tol, f"{name} {ov[-1]}: {k} differs by {err:.2e} (relative)"
        if first is None:
            first = a
        else:  # the members really are different runs
            assert max(float((first[k] - a[k]).abs().max()) for k in a) > 1e-3
    if "lr_step=4" in " ".join(common):  # the schedule halved the rate twice
        assert optimizer_tensors(pop[0])["lr"].item() == pytest.approx(0.001 / 4)


def test_few_shot_methods_group_over_seeds_and_the_others_say_why():
    few = ["dataset=digits_fewshot", "model=conv4"]
    groups = group_jobs(cfgs([*few, "method=maml", "seed=0"], [*few, "method=maml", "seed=1"],
                             [*few, "method=protonet", "seed=0"],
                             [*few, "method=protonet", "seed=1"],
                             [*few, "method=anil", "seed=0"], [*few, "method=anil", "seed=1"],
                             [*few, "method=maml", "seed=2", "method.meta_lr=0.01"]), 8)
    assert [g.jobs for g in groups] == [[0, 1], [2, 3], [4], [5], [6]]
    assert groups[0].keys == ["seed"]
    assert "ANIL has no population implementation" in groups[2].why_alone
    assert groups[4].why_alone  # meta_lr is not a population key of MAML


def test_few_shot_members_that_cannot_train_together_are_refused_with_a_reason():
    from types import SimpleNamespace

    from metacl.population.episodic import EpisodicPopulationLoop

    def member(precision="32-true", position=None):
        resume = None if position is None else SimpleNamespace(
            boundary={"position": {"epoch": position[0], "batch": position[1]}})
        cfg = compose_cfg(["dataset=digits_fewshot", "method=maml",
                           f"trainer.precision={precision}"])
        return SimpleNamespace(loop=SimpleNamespace(session=SimpleNamespace(cfg=cfg),
                                                    resume=resume))

    assert EpisodicPopulationLoop.blocker([member(), member()]) is None
    assert EpisodicPopulationLoop.blocker([member(position=(1, 2)),
                                           member(position=(1, 2))]) is None
    assert "32-true" in EpisodicPopulationLoop.blocker([member("bf16-mixed"), member()])
    assert "resume at different" in EpisodicPopulationLoop.blocker(
        [member(position=(1, 2)), member()])


def test_a_few_shot_population_stopped_and_resumed_equals_the_separate_runs(tmp_path):
    """2 epochs of 10 meta-batches, a checkpoint every 4 (inside the epochs), val episodes
    after each epoch, StepLR. SIGTERM once the members saved a checkpoint inside the first
    epoch; the same command with resume=true goes on as a population (weights, Adam and
    StepLR states, episode generators, random states). Its results and last.ckpt equal the
    separate runs' (the basic launcher), bit for bit."""
    import os
    import signal
    import time

    common = ["-m", "seed=0,1", "method=maml", "debug=fast", "dataset=digits_fewshot",
              "model=conv4", "model.channels=8", "method.meta_batch_size=2",
              "method.inner_steps_test=2", "method.n_epochs=2", "dataset.limit_tasks=10",
              "dataset.val_episodes=5", "dataset.limit_test_per_task=20", "method.lr_step=7",
              "checkpoint.every_n_steps=4", "logger=none"]
    pop = [*common, "hydra/launcher=population", "hydra.sweep.dir=pop"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *pop], cwd=tmp_path,
                            env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (not list((tmp_path / "pop").glob("*/checkpoints/last.ckpt"))
           and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "population of 2 jobs" in err and "one by one" not in err
    stopped = [json.loads(p.read_text()) for p in (tmp_path / "pop").glob("*/results.json")]
    assert [s["status"] for s in stopped] == ["interrupted", "interrupted"]
    positions = [torch.load(p, weights_only=True)["position"]
                 for p in (tmp_path / "pop").glob("*/checkpoints/last.ckpt")]
    assert positions[0] == positions[1] and positions[0]["epoch"] == 0, positions
    resumed = train([*pop, "resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "population of 2 jobs" in resumed.stderr
    alone = train([*common, "hydra.sweep.dir=alone"], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    accuracies = []
    for k in range(2):
        [name] = [p.name for p in (tmp_path / "alone").glob(f"{k}_*")]
        a = json.loads((tmp_path / "alone" / name / "results.json").read_text())
        p = json.loads((tmp_path / "pop" / name / "results.json").read_text())
        assert p["status"] == "completed" and p["population"] == {"members": 2, "index": k}
        for key in ("test_acc", "test_acc_per_step", "test_loss_per_step", "val_acc_per_epoch"):
            assert p["metrics"][key] == a["metrics"][key], key
        assert len(p["metrics"]["val_acc_per_epoch"]) == 2
        accuracies.append(p["metrics"]["test_acc_per_step"])
        ca, cp = (torch.load(tmp_path / d / name / "checkpoints" / "last.ckpt",
                             weights_only=True) for d in ("alone", "pop"))
        assert cp["step"] == ca["step"] == 20 and cp["position"] == ca["position"]
        for key, value in ca["method_state"].items():
            assert torch.equal(cp["method_state"][key], value), key
        sa, sp = ca["optimizer_states"][0]["state"], cp["optimizer_states"][0]["state"]
        assert sa.keys() == sp.keys() and sa
        for i in sa:
            assert all(torch.equal(sp[i][key], sa[i][key]) for key in sa[i])
        assert torch.equal(cp["generator"], ca["generator"])
    assert accuracies[0] != accuracies[1]  # two seeds, two different runs


def test_members_that_cannot_train_together_train_one_by_one_and_say_why(tmp_path):
    run = train(["-m", "seed=0,1", "method=er", "debug=fast", "trainer.precision=bf16-mixed",
                 "hydra/launcher=population", "hydra.sweep.dir=pop"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train one by one: continual populations train in 32-true precision" in run.stderr
    statuses = [json.loads(p.read_text()) for p in (tmp_path / "pop").rglob("results.json")]
    assert [r["status"] for r in statuses] == ["completed", "completed"]
    assert all("population" not in r for r in statuses)
