"""How the parts of a run talk: bounded queues between threads, torch.distributed between processes,
and one record of what failed.

Every part of a run (a stage, a sender, a receiver) runs under `run_part`, so any failure lands in
the run's `RunState`, the one channel through which failures reach the caller. A waiting part
checks it every POLL_SECONDS and stops when another part has failed; no wait is without bound.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time

import torch
import torch.distributed as dist

from al.local import ComponentTrainers
from al.pipeline.stage import END, Batch, Stage

POLL_SECONDS = 0.05  # how often a waiting part checks whether the run has failed
CPU = torch.device("cpu")


class PipelineError(RuntimeError):
    """A stage failed; the message names the stage and the cause."""


class StagesMissing(PipelineError):
    """The other ranks did not join rank 0 in time: nothing has trained yet."""


class Aborted(Exception):
    """Another part of the run failed first; this part stops without an error of its own."""


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
        entry = text if text.startswith("stage ") else f"{where}: {text}"  # a stage's own report names it
        with self._lock:
            if entry not in self.failures:
                self.failures.append(entry)
        self.aborted.set()

    def check(self) -> None:
        if self.health is not None and threading.current_thread() is self.owner:
            self.health(self)
        if self.aborted.is_set():
            raise Aborted

    def error(self) -> PipelineError:
        """One error naming what failed: the stages' own causes first, then what the other parts saw."""
        causes = sorted(self.failures, key=lambda f: not f.startswith("stage "))
        return PipelineError("pipeline failed: " + "; ".join(causes))


def run_part(run: RunState, where: str, work, *args) -> None:
    """Run one part (a stage, a sender, a receiver); a failure stops the whole run."""
    try:
        work(*args)
    except BaseException as e:  # noqa: B036 - every failure, KeyboardInterrupt included, must stop the run
        run.fail(where, e)


def start_part(run: RunState, where: str, work, *args) -> threading.Thread:
    thread = threading.Thread(target=run_part, args=(run, where, work, *args), name=where, daemon=True)
    thread.start()
    return thread


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


# --- processes: messages over torch.distributed -----------------------------------


HEADER = 10  # kind, step, number of losses, rank of s, shape of s (5 slots), width of t
BATCH, REPORT, END_KIND = 0, 1, 2
MESSAGE_TAG = 1  # state and commands (send_object) use tag 0
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

    return start_part(run, f"sending to rank {dst}", work)


def receive_thread(run: RunState, link: Link, src: int, device: torch.device, group) -> threading.Thread:
    def work():
        while True:
            item = recv_message(src, device, group)
            link.put(item)
            if item == END:
                return

    return start_part(run, f"receiving from rank {src}", work)


# Commands and states between ranks: their structure as JSON, their tensors as one byte buffer. Never pickle: a
# peer that reaches the rendezvous (stage traffic may cross a network) sends bytes, and bytes are all it sends.
MAX_STRUCTURE_BYTES = 64 << 20


def send_object(value, dst: int, control) -> None:
    tensors: list[torch.Tensor] = []
    structure = torch.frombuffer(bytearray(json.dumps(_encode(value, tensors)).encode()), dtype=torch.uint8)
    data = [t.reshape(-1).view(torch.uint8) for t in tensors]
    body = torch.cat(data) if data else torch.empty(0, dtype=torch.uint8)
    dist.send(torch.tensor([structure.numel(), body.numel()]), dst, group=control)
    dist.send(structure, dst, group=control)
    if body.numel():
        dist.send(body, dst, group=control)


def recv_object(src: int, control):
    sizes = torch.empty(2, dtype=torch.int64)
    dist.recv(sizes, src, group=control)
    structure_bytes, body_bytes = sizes.tolist()
    if not 0 < structure_bytes <= MAX_STRUCTURE_BYTES or body_bytes < 0:
        raise PipelineError(f"rank {src} sent a message that is not a stage's (sizes {structure_bytes}, {body_bytes})")
    structure, body = torch.empty(structure_bytes, dtype=torch.uint8), torch.empty(body_bytes, dtype=torch.uint8)
    dist.recv(structure, src, group=control)
    if body_bytes:
        dist.recv(body, src, group=control)
    try:
        tensors = _Tensors(body)
        value = _decode(json.loads(structure.numpy().tobytes()), tensors)
        tensors.check_all_read()
        return value
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise PipelineError(f"rank {src} sent a message that is not a stage's: {e}") from None


def _encode(value, tensors: list[torch.Tensor]):
    """JSON for a command or state: every container tagged (so dict keys keep their type), tensors by position."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().contiguous())
        return {"tensor": [str(value.dtype).removeprefix("torch."), list(value.shape)]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v, tensors) for v in value]}
    if isinstance(value, Stage):
        return {"stage": [value.index, value.components.start, value.components.stop, value.device]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a stage message carries no {type(value).__name__}")


class _Tensors:
    """The tensors of a received message, taken from its buffer in order."""

    def __init__(self, body: torch.Tensor):
        self.body, self.offset = body, 0

    def take(self, dtype_name: str, shape: list[int]) -> torch.Tensor:
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"no tensor of dtype {dtype_name!r} and shape {shape!r}")
        size = math.prod(shape) * dtype.itemsize
        if self.offset + size > self.body.numel():
            raise ValueError("its tensors are longer than its data")
        chunk = self.body[self.offset:self.offset + size].clone()  # its own storage: aligned for `dtype`
        self.offset += size
        return chunk.view(dtype).reshape(shape)

    def check_all_read(self) -> None:
        if self.offset != self.body.numel():
            raise ValueError("its data is longer than its tensors")


def _decode(value, tensors: _Tensors):
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise ValueError("an untagged list")
        return value
    [(kind, content)] = value.items()
    if kind == "tensor":
        return tensors.take(*content)
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in content]
        return items if kind == "list" else tuple(items)
    if kind == "stage":
        index, start, stop, device = content
        return Stage(index, range(start, stop), device)
    raise ValueError(f"an unknown kind {kind!r}")


def _cpu(value):
    """A state (nested dicts and lists of tensors) with every tensor copied to the CPU, for sending."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def components_state(trainers: ComponentTrainers, indices) -> dict:
    return {i: _cpu({"component": trainers[i].component.state_dict(),
                     "optimizers": [o.state_dict() for o in trainers[i].optimizers]}) for i in indices}


def load_components_state(trainers: ComponentTrainers, state: dict) -> None:
    for i, saved in state.items():
        trainers[i].component.load_state_dict(saved["component"])
        for optimizer, optimizer_state in zip(trainers[i].optimizers, saved["optimizers"]):
            optimizer.load_state_dict(optimizer_state)


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


def backend_for(devices: list[str]) -> str:
    """NCCL between distinct GPUs; gloo otherwise (CPU, or stages sharing one GPU, which NCCL refuses)."""
    cuda = all(torch.device(d).type == "cuda" for d in devices)
    return "nccl" if cuda and len(set(devices)) == len(devices) else "gloo"


def comm_device(backend: str, device: str) -> torch.device:
    """Where a batch must be to travel: on the GPU for NCCL, on the CPU for gloo."""
    return torch.device(device) if backend == "nccl" else CPU
