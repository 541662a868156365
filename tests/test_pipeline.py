"""Pipelined AL (al/pipeline/): exact against the sequential loop, failures stop the run, checkpoints cross modes.

Every run here uses one intra-op thread per stage and one in the sequential run:
with the same kernels on the same thread count, the pipeline must reproduce the
sequential weights bit for bit (spec section 4) - no tolerance. Every case here is
bit-identical, BatchNorm statistics and Adam state included; what would break it is
a different thread count between the runs (a kernel may then split its sums
differently), which is why the thread count is part of each test's set-up.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from al.checkpoint import load_model
from al.config import make_config
from al.data import load_dataset, prepare_splits
from al.model import build_network
from al.pipeline import PipelineError, balance_by_time, parse_stages, pipeline_runner
from al.run import train
from al.trainer import Callback, Trainer

DIGITS = load_dataset("digits")
MODELS = {
    "mlp": {"arch": "mlp", "widths": [24, 24, 24, 24], "target_width": 12},
    "cnn": {"arch": "cnn", "widths": [4, 4, 4, 4], "target_width": 12},
}
STAGES = {2: "0-1,2-3", 4: "0,1,2,3"}
TRAINING = {"epochs": 2, "batch_size": 64, "device": "cpu", "stage_threads": 1, "stage_timeout": 60,
            "schedule": "step"}


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_trainer(model: dict, callbacks=(), **training) -> Trainer:
    config = make_config("default", model, {**TRAINING, **training})
    model_cfg, train_cfg = config.model, config.training
    torch.manual_seed(train_cfg.seed)
    splits = prepare_splits(DIGITS, train_cfg.val_fraction, train_cfg.seed)
    net = build_network(model_cfg, DIGITS.input_shape, DIGITS.num_classes, "al")
    return Trainer(net, model_cfg, train_cfg, splits, callbacks, runner=pipeline_runner(train_cfg))


_sequential_cache: dict = {}


def sequential(arch: str) -> Trainer:
    if arch not in _sequential_cache:
        trainer = make_trainer(MODELS[arch])
        trainer.fit()
        _sequential_cache[arch] = trainer
    return _sequential_cache[arch]


def assert_same_training(a: Trainer, b: Trainer) -> None:
    wa, wb = a.net.state_dict(), b.net.state_dict()
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ: {different[:5]}"
    for oa, ob in zip(a.optimizers, b.optimizers):
        for (pa, sa), (pb, sb) in zip(oa.state_dict()["state"].items(), ob.state_dict()["state"].items()):
            assert pa == pb and all(torch.equal(sa[k], sb[k]) for k in sa)
    timing = ("seconds", "samples_per_second", "busy_seconds", "idle_fraction")
    strip = lambda history: [{k: v for k, v in m.items() if k not in timing} for m in history]
    assert strip(a.history) == strip(b.history)  # losses and accuracies of every epoch, exactly


@pytest.mark.parametrize("mode", ["threads", "processes"])
@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_pipelined_run_ends_bit_identical_to_sequential(one_thread, arch, stages, mode):
    reference = sequential(arch)
    piped = make_trainer(MODELS[arch], pipeline=mode, devices=["cpu"] * stages, stages=STAGES[stages])
    result = piped.fit()
    assert result["status"] == "completed"
    assert piped.runner.stats["stages"][-1].startswith(f"stage {stages - 1}")
    assert len(piped.history[-1]["busy_seconds"]) == len(piped.history[-1]["idle_fraction"]) == stages
    assert_same_training(reference, piped)


def test_default_split_is_balanced_by_measured_time_and_still_exact(one_thread):
    piped = make_trainer(MODELS["mlp"], pipeline="threads", devices=["cpu", "cpu"])
    piped.fit()
    seconds = piped.runner.component_seconds
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    groups = [s.components for s in piped.runner.stages]
    assert groups == balance_by_time(seconds, 2)
    assert_same_training(sequential("mlp"), piped)


def test_a_component_a_stage_is_not_timed(one_thread):
    piped = make_trainer(MODELS["mlp"], pipeline="threads", devices=["cpu"] * 4)
    piped.fit()
    assert piped.runner.component_seconds is None
    assert [s.components for s in piped.runner.stages] == [range(i, i + 1) for i in range(4)]


def test_balance_by_time_minimises_the_slowest_stage():
    assert balance_by_time([1, 1, 1, 5], 2) == [range(0, 3), range(3, 4)]
    assert balance_by_time([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert balance_by_time([1, 2, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_stage_lists_are_checked():
    assert parse_stages("0-1,2,3", 4) == [range(0, 2), range(2, 3), range(3, 4)]
    for bad in ("0-1,3", "1-3", "0-1,1-3", "a-b", "0-4"):
        with pytest.raises(ValueError, match="stages"):
            parse_stages(bad, 4)


def test_pipelining_bp_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="AL only"):
        make_config("default", MODELS["mlp"], {"method": "bp", "pipeline": "threads"})


# --- failures: an error that names the stage, never a hang ---------------------------


class FailOnCall(nn.Module):
    """Wraps an encoder and raises on its n-th forward call (importable, so a spawned stage can unpickle it)."""

    def __init__(self, inner: nn.Module, fail_at: int):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.inner(x)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_stage_that_raises_stops_the_run_with_its_name_and_cause(mode):
    trainer = make_trainer(MODELS["mlp"], pipeline=mode, devices=["cpu"] * 4, stages=STAGES[4])
    trainer.net.components[2].encoder = FailOnCall(trainer.net.components[2].encoder, fail_at=5)
    trainer.component_trainers[2].component = trainer.net.components[2]
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"stage 2 \(component 2 on cpu\).*RuntimeError: injected failure"):
        trainer.fit()
    assert time.monotonic() - started < 30


class KillStage(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step(self, trainer):
        if trainer.step_in_epoch == self.at_step:
            os.kill(trainer.runner.worker_pids[0], signal.SIGKILL)


def test_a_killed_stage_process_stops_the_run_with_an_error():
    trainer = make_trainer(MODELS["mlp"], [KillStage(at_step=3)], pipeline="processes", devices=["cpu"] * 2,
                           stages=STAGES[2], epochs=50)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"stage 1 \(components 2-3 on cpu\).*killed by SIGKILL"):
        trainer.fit()
    assert time.monotonic() - started < 30


class RaiseFromCallback(Callback):
    def on_step(self, trainer):
        if trainer.step_in_epoch == 3:
            raise KeyError("raised by a callback")


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_a_callback_error_reaches_the_caller_unchanged_and_ends_the_stages(mode):
    trainer = make_trainer(MODELS["mlp"], [RaiseFromCallback()], pipeline=mode, devices=["cpu"] * 2,
                           stages=STAGES[2])
    with pytest.raises(KeyError, match="raised by a callback"):
        trainer.fit()
    assert trainer.runner.worker_pids == []  # no stage process outlives the run


# --- checkpoints and resume across modes ----------------------------------------------


class StopAt(Callback):
    def __init__(self, global_step: int):
        self.global_step = global_step

    def on_step(self, trainer):
        if trainer.global_step >= self.global_step:
            trainer.request_stop()


@pytest.mark.parametrize("first, second", [("threads", "processes"), ("processes", "sequential")])
def test_a_checkpoint_from_one_mode_resumes_in_another(tmp_path, one_thread, first, second):
    model = MODELS["cnn"]
    common = {k: v for k, v in TRAINING.items()}
    straight = train(DIGITS, tmp_path / "straight", make_config("default", model, common))
    piped = {**common, "devices": ["cpu", "cpu"], "stages": STAGES[2]}
    stopped = train(DIGITS, tmp_path / "resumed", make_config("default", model, {**piped, "pipeline": first}),
                    callbacks=[StopAt(30)])  # mid-epoch 2 (23 batches an epoch)
    assert stopped["status"] == "stopped"
    second_training = {**piped, "pipeline": second} if second != "sequential" else common
    resumed = train(DIGITS, tmp_path / "resumed", make_config("default", model, second_training), resume=True)
    assert resumed["status"] == "completed"
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    model_dir = load_model(tmp_path / "resumed")  # inference needs nothing of the pipeline
    predictions = model_dir.predict(model_dir.request(DIGITS.test_x[:8])).classes
    assert len(predictions) == 8


# --- across hosts: the same code under torchrun, rank = stage --------------------------


def train_command(out: Path) -> list[str]:
    """`al train` of MODELS["mlp"] with TRAINING, two stages in `processes` mode: one per torchrun rank."""
    return [os.path.join(os.path.dirname(sys.executable), "al"), "train", "--dataset", "digits",
            "--widths", "24,24,24,24", "--target-width", "12", "--epochs", "2", "--batch-size", "64",
            "--schedule", "step", "--device", "cpu", "--pipeline", "processes", "--devices", "cpu,cpu",
            "--stages", "0-1,2-3", "--stage-threads", "1", "--quiet", "--json", "--out", str(out)]


def assert_same_as_sequential(tmp_path: Path, ranked: Path, stdout: str) -> None:
    straight = train(DIGITS, tmp_path / "straight", make_config("default", MODELS["mlp"], TRAINING))
    a, b = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "straight", ranked))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert f'"test_accuracy": {straight["test_accuracy"]}' in stdout


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def test_torchrun_ranks_train_the_stages(tmp_path, one_thread):
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *train_command(tmp_path / "ranked")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as_sequential(tmp_path, tmp_path / "ranked", done.stdout)


def test_torchrun_across_two_hosts_trains_the_stages(tmp_path, one_thread):
    """One torchrun per host (a network namespace, benchmarks/hosts.py), each with its own --out."""
    from benchmarks.hosts import Hosts, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # gloo binds to the address the hostname resolves to, which is often 127.0.0.1 (/etc/hosts): each
    # rank would then offer its own loopback to the other ("Connection refused, remote=[127.0.0.1]").
    # Naming the interface makes it bind to the host's address on the bridge.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
    with Hosts(2) as hosts:
        ranks = [
            subprocess.Popen(host.command([
                # any port: the hosts' network is private to this test
                TORCHRUN, "--nnodes", "2", "--node-rank", str(k), "--nproc-per-node", "1",
                "--master-addr", hosts[0].address, "--master-port", "29500",
                *train_command(tmp_path / f"host{k}")]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=environment)
            for k, host in enumerate(hosts)
        ]
        # A rank that hangs makes communicate raise; leaving the block then kills every process in the hosts.
        done = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    assert '"status": "stage worker"' in done[1][0] and not (tmp_path / "host1" / "model.safetensors").exists()
    assert_same_as_sequential(tmp_path, tmp_path / "host0", done[0][0])


def _alive(pid: int) -> bool:
    try:  # a zombie (when no init reaps it) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_stage_process_dies_with_its_sigkilled_parent():
    """What every spawned stage process calls first: a Celery pool process SIGKILLed mid-job must not leave a
    stage that is blocked on a peer (NCCL notices no dead socket) holding memory or a GPU until the timeout."""
    stage = ("import os, time; from al.processes import die_with_parent; die_with_parent(os.getppid()); "
             "print('ready', flush=True); time.sleep(600)")
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         f"child = subprocess.Popen([sys.executable, '-c', {stage!r}], stdout=subprocess.PIPE, text=True); "
         "child.stdout.readline(); print(child.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive
