"""Pipelined AL training: stages of consecutive components that train at the same time.

The schedule (spec section 4): at tick tau, stage i trains on mini-batch tau - i.
Messages go forward only - (sg(s), sg(t), labels) of one mini-batch - and no
gradient, weight or flush ever goes back, so every component trains on the same
batches, in the same order, with the same weights as in the sequential loop, and
ends bit-identical to it when its kernels are (one intra-op thread per stage).

One stage loop, two transports:
- threads: stage 0 runs on the trainer's thread, stages 1.. on threads of their
  own; bounded queues (`Link`) between them.
- processes: stage 0 runs in the trainer's process (rank 0), stage k in rank k:
  processes spawned here on one host, or started by torchrun across hosts.
  torch.distributed send/recv (gloo; NCCL between distinct GPUs) move the
  messages, through one sender and one receiver thread per neighbour that feed
  the same bounded queues.

The last stage reports each finished mini-batch with its losses to the trainer,
which records it as the sequential loop does (loss sums, on_step callbacks,
request_stop). The end of a run of batches (epoch end or stop) is a sync point:
every stage drains, worker processes send their components and optimizer state
to rank 0, and the trainer evaluates and writes checkpoints from the whole model.

Intra-op threads on CPU: torch.set_num_threads is per thread (OpenMP and MKL keep
the count per thread), but it also overwrites a process-wide default that a thread
adopts lazily at its first parallel op. A stage thread that sets its count before
that first op is reset to whatever a neighbour set last; measured on torch 2.13:
thread A sets 1, thread B sets 2, A's matmuls then run on 2 threads. So each stage
calls torch.get_num_threads() (which runs the lazy initialisation) first.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import pickle
import queue
import resource
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from al.train import ComponentTrainer, lr_multiplier, train_components

POLL_SECONDS = 0.05  # how often a waiting stage checks whether the run has failed
PROFILE_STEPS = 3
CPU = torch.device("cpu")
ERROR_KEY = "al_pipeline/error/{}"  # in the process group's store: why a worker failed
STARTED_KEY = "al_pipeline/started/{}"


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and the cause."""


class Aborted(Exception):
    """Another part of the run failed first; this part stops without an error of its own."""


# --- stages and how to split the components ---------------------------------------


@dataclass(frozen=True)
class Stage:
    index: int
    components: range
    device: str

    def __str__(self) -> str:
        first, last = self.components[0], self.components[-1]
        which = f"component {first}" if first == last else f"components {first}-{last}"
        return f"stage {self.index} ({which} on {self.device})"


def parse_stages(text: str, depth: int) -> list[range]:
    """'0-1,2-3' -> [range(0, 2), range(2, 4)]; the groups must cover 0..depth-1 in order."""
    groups = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            groups.append(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"stages must look like 0-1,2-3, got {text!r}") from None
    if [c for g in groups for c in g] != list(range(depth)) or any(len(g) == 0 for g in groups):
        raise ValueError(f"stages {text!r} must list the components 0..{depth - 1} once each, in order")
    return groups


def balance_by_time(seconds: list[float], parts: int) -> list[range]:
    """Consecutive groups of components such that the slowest group is as fast as possible."""
    n = len(seconds)
    prefix = [0.0, *itertools.accumulate(seconds)]
    # best[k, j]: (time of the slowest group, groups) for the first j components in k groups
    best = {(0, 0): (0.0, [])}
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            best[k, j] = min(
                ((max(best[k - 1, i][0], prefix[j] - prefix[i]), [*best[k - 1, i][1], range(i, j)])
                 for i in range(k - 1, j) if (k - 1, i) in best),
                key=lambda candidate: candidate[0],
            )
    return best[parts, n][1]


def measure_component_seconds(trainer, threads: int, steps: int = PROFILE_STEPS) -> list[float]:
    """Seconds per mini-batch of each component, timed on copies so that training is untouched."""
    x, y = next(trainer.batches(trainer.epoch))
    s, t = x, F.one_hot(y, trainer.net.num_classes).float()
    seconds = []
    synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    with intra_op_threads(threads):
        for local in trainer.locals:
            probe = copy.deepcopy(local)
            probe.step(s, t, y, 1.0)  # warm-up: first-call allocations and kernel selection
            synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                s_next, t_next, _, _ = probe.step(s, t, y, 1.0)
            synchronize()
            seconds.append((time.perf_counter() - started) / steps)
            s, t = s_next, t_next
    return seconds


def default_devices(trainer, count: int | None) -> list[str]:
    """One stage per CPU core (or per GPU), at most one per component; `count` stages under torchrun."""
    if trainer.device.type == "cuda":
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        n = count or min(trainer.net.depth, len(gpus))
        return [gpus[i % len(gpus)] for i in range(n)]
    return ["cpu"] * (count or max(1, min(trainer.net.depth, os.cpu_count() or 1)))


@contextmanager
def intra_op_threads(count: int):
    """The calling thread's intra-op thread count, restored afterwards (see the module docstring)."""
    previous = torch.get_num_threads()  # also runs torch's lazy per-thread initialisation
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def stage_context(stage: Stage, threads: int):
    """A stage's thread works on its device: its share of the cores, or its own CUDA stream."""
    device = torch.device(stage.device)
    if device.type == "cuda":
        with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
            yield
    else:
        with intra_op_threads(threads):
            yield


# --- messages and the stage loop ------------------------------------------------------


@dataclass
class Batch:
    """One mini-batch on its way through the stages; the last stage's report carries no tensors but losses."""

    step: int  # global step: the learning-rate schedule's clock
    s: torch.Tensor | None
    t: torch.Tensor | None
    labels: torch.Tensor | None
    losses: list[torch.Tensor]  # A_i, R_i of the components that have trained on it so far


END = "end of batches"  # sentinel: no more batches before the next sync


class StageRunner:
    """Trains one stage's components on each mini-batch that reaches it."""

    def __init__(self, stage: Stage, locals: list[ComponentTrainer], total_steps: int, last: bool):
        self.stage, self.locals, self.total_steps, self.last = stage, locals, total_steps, last
        self.device = torch.device(stage.device)
        self.schedule = locals[0].train_cfg.schedule
        self.busy_seconds = 0.0

    def train(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        s, t, labels = (x.to(self.device, non_blocking=True) for x in (batch.s, batch.t, batch.labels))
        lr_factor = lr_multiplier(self.schedule, batch.step, self.total_steps)
        s, t, losses = train_components(self.locals, s, t, labels, lr_factor)
        if self.device.type == "cuda":
            # The next stage reads s and t from another stream, and `batch` (the input) may be
            # freed once this returns: both need this stage's kernels finished.
            torch.cuda.current_stream(self.device).synchronize()
        self.busy_seconds += time.perf_counter() - started
        if self.last:
            return Batch(batch.step, None, None, None, batch.losses + losses)
        return Batch(batch.step, s, t, labels, batch.losses + losses)


class RunState:
    """What the parts of one run of batches share: the failures, an abort flag, the wait limit."""

    def __init__(self, timeout: float, health=None):
        self.timeout = timeout
        # Called while the creating thread waits; it may record a failure (a dead process).
        # Only that thread calls it: reaping child processes from several threads races.
        self.health = health
        self.owner = threading.current_thread()
        self.failures: list[str] = []
        self.aborted = threading.Event()
        self._lock = threading.Lock()

    def fail(self, where: str, error: BaseException | str) -> None:
        if isinstance(error, Aborted):
            return
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._lock:
            self.failures.append(f"{where}: {text}")
        self.aborted.set()

    def check(self) -> None:
        if self.health is not None and threading.current_thread() is self.owner:
            self.health(self)
        if self.aborted.is_set():
            raise Aborted


def run_part(run: RunState, where: str, work, *args) -> None:
    """Run one part (a stage, a sender, a receiver); a failure stops the whole run."""
    try:
        work(*args)
    except BaseException as e:  # noqa: B036 - every failure, KeyboardInterrupt included, must stop the run
        run.fail(where, e)


class Link:
    """A bounded queue between two parts of a run; waits give up when the run fails or after the timeout."""

    def __init__(self, name: str, depth: int, run: RunState):
        self.name, self.run = name, run
        self.queue = queue.Queue(maxsize=depth)  # depth 0: unbounded

    def put(self, item) -> None:
        self._wait(lambda: self.queue.put(item, timeout=POLL_SECONDS), queue.Full)

    def get(self):
        return self._wait(lambda: self.queue.get(timeout=POLL_SECONDS), queue.Empty)

    def poll(self):
        """The next item, or None if there is none yet."""
        self.run.check()
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def _wait(self, operation, still_waiting):
        deadline = time.monotonic() + self.run.timeout
        while True:
            self.run.check()
            try:
                return operation()
            except still_waiting:
                if time.monotonic() > deadline:
                    raise PipelineError(f"{self.name}: nothing moved for {self.run.timeout:g} s") from None


def serve(runner: StageRunner, inbox: Link, outbox: Link, threads: int) -> None:
    """The stage loop: train each mini-batch that arrives and pass it on, until END."""
    with stage_context(runner.stage, threads):
        while True:
            item = inbox.get()
            if item == END:
                outbox.put(END)
                return
            outbox.put(runner.train(item))


# --- processes: messages over torch.distributed -----------------------------------


HEADER = 10  # kind, step, number of losses, rank of s, shape of s (5 slots), width of t
BATCH, REPORT, END_KIND = 0, 1, 2
MESSAGE_TAG = 1  # state and commands use send_object_list's tag 0
# Blocking send/recv wait at most the process group's timeout (stage_timeout). Work.wait(timeout)
# would say so explicitly but polls: measured 2.6 ms per round trip against 0.17 ms blocking.


def send_message(item, dst: int, device: torch.device, group) -> None:
    """A header, then s, t, labels and losses packed into one float32 tensor (labels < 2**24 are exact)."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    parts: list[torch.Tensor] = []
    if item == END:
        header[0] = END_KIND
    else:
        header[:3] = torch.tensor([REPORT if item.s is None else BATCH, item.step, len(item.losses)])
        if item.s is not None:
            if item.s.dim() > 5:
                raise ValueError(f"a message carries s of at most 5 dimensions, got {item.s.dim()}")
            header[3] = item.s.dim()
            header[4 : 4 + item.s.dim()] = torch.tensor(item.s.shape)
            header[9] = item.t.shape[1]
            parts += [item.s.reshape(-1), item.t.reshape(-1), item.labels.float()]
        parts += [loss.reshape(1) for loss in item.losses]
    dist.send(header.to(device), dst, group=group, tag=MESSAGE_TAG)
    if parts:
        dist.send(torch.cat([p.to(device, torch.float32) for p in parts]), dst, group=group, tag=MESSAGE_TAG)


def recv_message(src: int, device: torch.device, group):
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group, tag=MESSAGE_TAG)
    kind, step, loss_count, s_rank, *rest = header.tolist()
    if kind == END_KIND:
        return END
    sizes = [loss_count]
    if kind == BATCH:
        s_shape, rows, t_width = rest[:s_rank], rest[0], rest[5]
        sizes = [math.prod(s_shape), rows * t_width, rows, loss_count]
    payload = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dist.recv(payload, src, group=group, tag=MESSAGE_TAG)
    pieces = payload.split(sizes)
    if kind == REPORT:
        return Batch(step, None, None, None, list(pieces[0]))
    s, t, labels, losses = pieces
    return Batch(step, s.view(s_shape), t.view(rows, t_width), labels.long(), list(losses))


def send_thread(run: RunState, link: Link, dst: int, device: torch.device, group) -> threading.Thread:
    def work():
        while True:
            item = link.get()
            send_message(item, dst, device, group)
            if item == END:
                return

    return _start(run, f"sending to rank {dst}", work)


def receive_thread(run: RunState, link: Link, src: int, device: torch.device, group) -> threading.Thread:
    def work():
        while True:
            item = recv_message(src, device, group)
            link.put(item)
            if item == END:
                return

    return _start(run, f"receiving from rank {src}", work)


def _start(run: RunState, where: str, work) -> threading.Thread:
    thread = threading.Thread(target=run_part, args=(run, where, work), name=where, daemon=True)
    thread.start()
    return thread


def _cpu(value):
    """A state (nested dicts and lists of tensors) with every tensor copied to the CPU, for sending."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def components_state(locals: dict[int, ComponentTrainer], indices) -> dict:
    return {i: _cpu({"component": locals[i].component.state_dict(),
                     "optimizers": [o.state_dict() for o in locals[i].optimizers]}) for i in indices}


def load_components_state(locals: dict[int, ComponentTrainer], state: dict) -> None:
    for i, saved in state.items():
        locals[i].component.load_state_dict(saved["component"])
        for optimizer, optimizer_state in zip(locals[i].optimizers, saved["optimizers"]):
            optimizer.load_state_dict(optimizer_state)


def send_object(value, dst: int, control) -> None:
    dist.send_object_list([value], dst, group=control, device=CPU)


def recv_object(src: int, control):
    box = [None]
    dist.recv_object_list(box, src, group=control, device=CPU)
    return box[0]


def join_group(backend: str, device: str, **init):
    """Join the process group; returns the gloo group for commands, state and reports.

    With NCCL that is a second group: commands and state are CPU objects, and NCCL must never
    carry two transfers between one pair of ranks from two threads (rank 0 sends batches to
    rank 1 while a 2-stage run's rank 1 reports back).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **init)
    return dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def serve_rank(rank: int, locals: dict[int, ComponentTrainer], control, timeout: float) -> None:
    """A worker process (rank > 0): for each command from rank 0, load the state, train, send it back."""
    while True:
        command = recv_object(0, control)
        if command is None:
            return
        stage: Stage = command["stage"]
        comm = _comm_device(dist.get_backend(), stage.device)
        for i in stage.components:
            _move(locals[i], stage.device)
        if command["state"] is not None:
            load_components_state(locals, command["state"])
        last = stage.index == command["stages"] - 1
        run = RunState(timeout)
        depth = command["queue_depth"]
        inbox, outbox = Link(f"{stage} inbox", depth, run), Link(f"{stage} outbox", depth, run)
        receiving = receive_thread(run, inbox, rank - 1, comm, dist.group.WORLD)
        sending = send_thread(run, outbox, 0, CPU, control) if last else send_thread(run, outbox, rank + 1, comm,
                                                                                      dist.group.WORLD)
        threads = [receiving, sending]
        runner = StageRunner(stage, [locals[i] for i in stage.components], command["total_steps"], last)
        run_part(run, str(stage), serve, runner, inbox, outbox, command["threads"])
        if not run.failures:  # after a failure a receiver may wait on a live peer: do not join it
            for thread in threads:
                thread.join()
        if run.failures:
            raise PipelineError("; ".join(run.failures))
        send_object({"state": components_state(locals, stage.components), "busy_seconds": runner.busy_seconds,
                     "peak_rss_bytes": peak_rss_bytes()}, 0, control)


def _worker_process(rank: int, world: int, port: int, backend: str, device: str, payload: bytes,
                    timeout: float) -> None:
    """Entry of a spawned stage process: joins the process group and serves until rank 0 says stop."""
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=timeout))
    try:
        locals = pickle.loads(payload)
        store.set(STARTED_KEY.format(rank), "1")
        control = join_group(backend, device, store=store, rank=rank, world_size=world,
                             timeout=timedelta(seconds=timeout))
        serve_rank(rank, locals, control, timeout)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: B036 - report every failure to rank 0 before dying
        store.set(ERROR_KEY.format(rank), str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


def _comm_device(backend: str, device: str) -> torch.device:
    return torch.device(device) if backend == "nccl" else CPU


def _move(local: ComponentTrainer, device: str) -> None:
    """A component and its optimizer state onto a device (parameters keep their identity)."""
    local.component.to(device)
    for optimizer in local.optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":  # Adam keeps `step` on the CPU
                    state[key] = value.to(device)


def _on_cpu(local: ComponentTrainer) -> ComponentTrainer:
    local = copy.deepcopy(local)
    _move(local, "cpu")
    return local


def backend_for(devices: list[str]) -> str:
    """NCCL between distinct GPUs; gloo otherwise (CPU, or stages sharing one GPU, which NCCL refuses)."""
    cuda = all(torch.device(d).type == "cuda" for d in devices)
    return "nccl" if cuda and len(set(devices)) == len(devices) else "gloo"


# --- the pipeline the trainer drives --------------------------------------------------


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class Pipeline:
    """Runs the trainer's AL mini-batches in stages; built by the Trainer when cfg.pipeline is not sequential."""

    def __init__(self, trainer):
        if trainer.cfg.method != "al":
            raise ValueError("pipelining is for AL only: BP's backward pass locks every layer until the loss is known")
        self.trainer, self.cfg = trainer, trainer.cfg
        self.locals = dict(enumerate(trainer.locals))
        self.torchrun = torchrun_rank() if self.cfg.pipeline == "processes" else None
        self.stages: list[Stage] | None = None
        self.threads = 1
        self.stats: dict = {}  # of the last run of batches: per-stage busy seconds, wall seconds, peak memory
        self.component_seconds: list[float] | None = None
        self._workers: list = []  # spawned stage processes, index k-1 for rank k
        self._store = None
        self._backend = "gloo"
        self._control = None  # the gloo group for commands, state and reports
        self._mid_run = False  # workers are inside a run of batches, not waiting for a command
        # Workers keep their state between runs of batches; rank 0 sends it only to fresh workers
        # (its copy, pulled at every sync, changes only through load_state_dict before fit).
        self._workers_hold_state = False

    @property
    def is_worker(self) -> bool:
        """True in a torchrun rank > 0, which trains its stage for rank 0 and does nothing else."""
        return self.torchrun is not None and self.torchrun[0] > 0

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the spawned stages 1.. (processes mode on one host)."""
        return [p.pid for p in self._workers]

    # --- planning ---

    def plan(self) -> list[Stage]:
        trainer, cfg = self.trainer, self.cfg
        devices = list(cfg.devices or default_devices(trainer, self.torchrun and self.torchrun[1]))
        if self.torchrun and len(devices) != self.torchrun[1]:
            raise ValueError(f"torchrun started {self.torchrun[1]} ranks for {len(devices)} devices: one per stage")
        if len(devices) > trainer.net.depth:
            raise ValueError(f"{len(devices)} devices for {trainer.net.depth} components: one stage needs a component")
        cpu_stages = sum(torch.device(d).type == "cpu" for d in devices)
        self.threads = cfg.stage_threads or max(1, (os.cpu_count() or 1) // max(cpu_stages, 1))
        if cfg.stages:
            groups = parse_stages(cfg.stages, trainer.net.depth)
            if len(groups) != len(devices):
                raise ValueError(f"stages {cfg.stages!r} make {len(groups)} stages for {len(devices)} devices")
        else:
            self.component_seconds = measure_component_seconds(trainer, self.threads)
            groups = balance_by_time(self.component_seconds, len(devices))
        return [Stage(i, group, device) for i, (group, device) in enumerate(zip(groups, devices))]

    # --- one run of batches: the rest of the epoch, or until a stop is requested ---

    def train_batches(self) -> None:
        if self.stages is None:
            self.stages = self.plan()
        if self.cfg.pipeline == "threads":
            self._train_threads()
        else:
            self._train_processes()

    def _runner(self, stage: Stage) -> StageRunner:
        last = stage.index == len(self.stages) - 1
        return StageRunner(stage, [self.locals[i] for i in stage.components], self.trainer.total_steps, last)

    def _train_threads(self) -> None:
        stages = self.stages
        run = RunState(self.cfg.stage_timeout)
        for stage in stages:
            for i in stage.components:
                _move(self.locals[i], stage.device)
        inboxes = [Link(f"queue into {stage}", self.cfg.queue_depth, run) for stage in stages[1:]]
        reports = Link("reports to the trainer", 0, run)  # unbounded: the stages never wait on the trainer
        outboxes = [*inboxes, reports]
        runners = [self._runner(stage) for stage in stages]
        threads = [
            threading.Thread(target=run_part, args=(run, str(stage), serve, runners[k], inboxes[k - 1], outboxes[k],
                                                    self.threads), name=str(stage), daemon=True)
            for k, stage in enumerate(stages) if k > 0
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        try:
            self._coordinate(run, runners[0], outboxes[0], reports)
        finally:
            run.aborted.set()  # the stages have passed END by now, or must stop
            for thread in threads:
                thread.join(timeout=self.cfg.stage_timeout)
            for local in self.locals.values():
                _move(local, str(self.trainer.device))
        self._record_stats(started, [r.busy_seconds for r in runners], [peak_rss_bytes()])

    def _coordinate(self, run: RunState, first: StageRunner, downstream: Link, reports: Link) -> None:
        """Feed stage 0 on this thread, pass its output on, record the reports of the last stage."""
        trainer = self.trainer
        start = trainer.global_step
        try:
            with stage_context(first.stage, self.threads):
                fed = 0
                for x, y in trainer.batches(trainer.epoch, trainer.step_in_epoch):
                    t = F.one_hot(y, trainer.net.num_classes).float()
                    try:
                        out = first.train(Batch(start + fed, x, t, y, []))
                    except Exception as e:
                        run.fail(str(first.stage), e)
                        raise self._failure(run) from e
                    downstream.put(out)
                    fed += 1
                    self._record_reports(reports, until_end=False)
                    if trainer.stop_requested:
                        break
                downstream.put(END)
                self._record_reports(reports, until_end=True)
        except Aborted:
            raise self._failure(run) from None
        except BaseException:  # noqa: B036 - a callback's error (or Ctrl-C) is the caller's: stop the stages, pass it on
            run.aborted.set()
            raise

    def _record_reports(self, reports: Link, until_end: bool) -> None:
        while True:
            item = reports.get() if until_end else reports.poll()
            if item is None or item == END:
                return
            self.trainer.record_step([loss.to(self.trainer.device) for loss in item.losses])

    def _record_stats(self, started: float, busy: list[float], peak_rss: list[int]) -> None:
        wall = time.perf_counter() - started
        self.stats = {
            "stages": [str(s) for s in self.stages],
            "wall_seconds": wall,
            "busy_seconds": busy,
            "idle_fraction": [max(0.0, 1 - b / wall) for b in busy] if wall > 0 else [],
            "peak_rss_bytes": peak_rss,
        }

    # --- processes ---

    def _train_processes(self) -> None:
        if self._control is None:
            self._start_processes()
        stages, comm, control = self.stages, _comm_device(self._backend, self.stages[0].device), self._control
        run = RunState(self.cfg.stage_timeout, health=self._check_workers)
        self._mid_run = True
        with self._transfer_errors(run):
            for stage in stages[1:]:
                state = None if self._workers_hold_state else components_state(self.locals, stage.components)
                send_object({"stage": stage, "stages": len(stages), "queue_depth": self.cfg.queue_depth,
                             "threads": self.threads, "total_steps": self.trainer.total_steps, "state": state},
                            stage.index, control)
        self._workers_hold_state = True
        for i in stages[0].components:
            _move(self.locals[i], stages[0].device)
        reports = Link("reports to the trainer", 0, run)
        downstream, threads = reports, []
        if len(stages) > 1:
            downstream = Link(f"queue out of {stages[0]}", self.cfg.queue_depth, run)
            threads = [send_thread(run, downstream, 1, comm, dist.group.WORLD),
                       receive_thread(run, reports, len(stages) - 1, CPU, control)]
        runner = self._runner(stages[0])
        started = time.perf_counter()
        self._coordinate(run, runner, downstream, reports)
        for thread in threads:
            thread.join()
        busy, peak = [runner.busy_seconds], [peak_rss_bytes()]
        with self._transfer_errors(run):
            for stage in stages[1:]:
                answer = recv_object(stage.index, control)
                load_components_state(self.locals, answer["state"])
                busy.append(answer["busy_seconds"])
                peak.append(answer["peak_rss_bytes"])
        self._mid_run = False
        for local in self.locals.values():
            _move(local, str(self.trainer.device))
        self._record_stats(started, busy, peak)

    @contextmanager
    def _transfer_errors(self, run: RunState):
        """A command or state transfer that fails (a gloo/NCCL error or timeout) names the stages that failed."""
        try:
            yield
        except RuntimeError as e:
            run.fail(f"{self.stages[0]}, talking to the other stages", e)
            raise self._failure(run) from e

    def _start_processes(self) -> None:
        devices = [s.device for s in self.stages]
        self._backend = backend_for(devices)
        timeout = timedelta(seconds=self.cfg.stage_timeout)
        if self.torchrun:
            # rendezvous from torchrun's environment
            self._control = join_group(self._backend, self.stages[0].device, timeout=timeout)
            self._store = dist.distributed_c10d._get_default_store()
            return
        world = len(self.stages)
        self._store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        context = torch.multiprocessing.get_context("spawn")
        for stage in self.stages[1:]:
            # Plain pickle of CPU copies: torch.multiprocessing would share the tensors' memory with the
            # child, and pickled CUDA tensors would open a context on this process's GPU in the child.
            payload = pickle.dumps({i: _on_cpu(self.locals[i]) for i in stage.components})
            process = context.Process(
                target=_worker_process, name=f"al {stage}", daemon=True,
                args=(stage.index, world, self._store.port, self._backend, stage.device, payload,
                      self.cfg.stage_timeout),
            )
            process.start()
            self._workers.append(process)
        run = RunState(self.cfg.stage_timeout, health=self._check_workers)
        deadline = time.monotonic() + self.cfg.stage_timeout
        for stage in self.stages[1:]:  # a worker that dies while starting must not leave rank 0 waiting
            while not self._store.check([STARTED_KEY.format(stage.index)]):
                try:
                    run.check()
                except Aborted:
                    raise self._failure(run) from None
                if time.monotonic() > deadline:
                    raise PipelineError(f"{stage} did not start within {self.cfg.stage_timeout:g} s")
                time.sleep(POLL_SECONDS)
        self._control = join_group(self._backend, self.stages[0].device, store=self._store, rank=0,
                                   world_size=world, timeout=timeout)

    def _check_workers(self, run: RunState) -> None:
        for stage, process in zip(self.stages[1:], self._workers):
            if process.exitcode is not None and not run.aborted.is_set():
                run.fail(str(stage), _exit_text(process.exitcode))

    def _failure(self, run: RunState) -> PipelineError:
        """One error naming the failed stages: their own reports first, then what rank 0 saw."""
        deadline = time.monotonic() + 2.0  # let dying workers write their cause
        while self._workers and any(p.exitcode is None for p in self._workers) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        causes = []
        if self._store is not None:
            for stage in self.stages[1:]:
                key = ERROR_KEY.format(stage.index)
                if self._store.check([key]):
                    text = self._store.get(key).decode()
                    causes.append(text if text.startswith("stage ") else f"{stage}: {text}")
        for stage, process in zip(self.stages[1:], self._workers):
            if process.exitcode is not None and process.exitcode != 0:
                causes.append(f"{stage}: {_exit_text(process.exitcode)}")
        causes += [f for f in run.failures if f not in causes]
        return PipelineError("pipeline failed: " + "; ".join(dict.fromkeys(causes)))

    def serve(self) -> dict:
        """A torchrun rank > 0: train this rank's stage whenever rank 0 asks, until it says stop."""
        rank, world = self.torchrun
        devices = list(self.cfg.devices or default_devices(self.trainer, world))
        control = join_group(backend_for(devices), devices[rank], timeout=timedelta(seconds=self.cfg.stage_timeout))
        try:
            serve_rank(rank, self.locals, control, self.cfg.stage_timeout)
        except BaseException as e:  # noqa: B036 - tell rank 0 why before torchrun tears the group down
            dist.distributed_c10d._get_default_store().set(ERROR_KEY.format(rank), f"{type(e).__name__}: {e}")
            raise
        finally:
            dist.destroy_process_group()
        return {"status": "stage worker", "rank": rank}

    def close(self) -> None:
        """End the worker processes: a stop command when they are healthy, a kill otherwise."""
        if self.cfg.pipeline != "processes":
            return
        healthy = self._control is not None and not self._mid_run and all(p.exitcode is None for p in self._workers)
        try:
            if healthy:
                for stage in self.stages[1:]:
                    send_object(None, stage.index, self._control)
            for process in self._workers:
                process.join(timeout=10 if healthy else 0)
        except RuntimeError:
            pass  # a worker already gone: it is killed below
        finally:
            for process in self._workers:
                if process.exitcode is None:
                    process.kill()
                    process.join()
            self._workers = []
            self._workers_hold_state = self._mid_run = False
            if self._control is not None:
                dist.destroy_process_group()
            self._store = self._control = None


def _exit_text(code: int) -> str:
    if code < 0:
        return f"process killed by {signal.Signals(-code).name}"
    return f"process exited with code {code}"
