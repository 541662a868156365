"""One stage: its components, the thread it runs on, and the loop that trains each mini-batch that reaches it.

Intra-op threads on CPU: torch.set_num_threads is per thread (OpenMP and MKL keep
the count per thread), but it also overwrites a process-wide default that a thread
adopts lazily at its first parallel op. A stage thread that sets its count before
that first op is reset to whatever a neighbour set last; measured on torch 2.13:
thread A sets 1, thread B sets 2, A's matmuls then run on 2 threads. So each stage
calls torch.get_num_threads() (which runs the lazy initialisation) first.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from al.local import ComponentTrainer, lr_factors, train_components


@dataclass(frozen=True)
class Stage:
    index: int
    components: range
    device: str

    def __str__(self) -> str:
        first, last = self.components[0], self.components[-1]
        which = f"component {first}" if first == last else f"components {first}-{last}"
        return f"stage {self.index} ({which} on {self.device})"


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


def move(trainer: ComponentTrainer, device: str) -> None:
    """A component and its optimizer state onto a device (parameters keep their identity)."""
    trainer.component.to(device)
    for optimizer in trainer.optimizers:
        step_moves = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
        for state in optimizer.state.values():
            for key, value in state.items():
                # The for-loop Adam keeps `step` on the CPU; the fused one beside its parameter.
                if isinstance(value, torch.Tensor) and (key != "step" or step_moves):
                    state[key] = value.to(device)


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

    def __init__(self, stage: Stage, trainers: list[ComponentTrainer], total_steps: int, last: bool):
        self.stage, self.component_trainers, self.total_steps, self.last = stage, trainers, total_steps, last
        self.device = torch.device(stage.device)
        self.train_cfg = trainers[0].train_cfg
        self.busy_seconds = 0.0

    def train(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        s, t, labels = (x.to(self.device, non_blocking=True) for x in (batch.s, batch.t, batch.labels))
        factors = lr_factors(self.train_cfg, batch.step, self.total_steps)
        s, t, losses = train_components(self.component_trainers, s, t, labels, factors)
        if self.device.type == "cuda":
            # The next stage reads s and t from another stream, and `batch` (the input) may be
            # freed once this returns: both need this stage's kernels finished.
            torch.cuda.current_stream(self.device).synchronize()
        self.busy_seconds += time.perf_counter() - started
        if self.last:
            return Batch(batch.step, None, None, None, batch.losses + losses)
        return Batch(batch.step, s, t, labels, batch.losses + losses)


def serve(runner: StageRunner, inbox, outbox, threads: int) -> None:
    """The stage loop: train each mini-batch that arrives in `inbox` and pass it on to `outbox`, until END."""
    with stage_context(runner.stage, threads):
        while True:
            item = inbox.get()
            if item == END:
                outbox.put(END)
                return
            outbox.put(runner.train(item))
