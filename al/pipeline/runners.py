"""The pipeline runners the trainer drives: stage 0 on the trainer's thread, the other stages on
threads (`ThreadsRunner`) or in processes (`ProcessesRunner`), each a `Runner` (al/local.py).

A run of batches ends at a sync point (the epoch's end, or a stop): every stage drains, stage
processes send their components and optimizer state back, and the trainer then has the whole
model to evaluate and checkpoint.
"""

from __future__ import annotations

import itertools
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist
import torch.nn.functional as F

from al.config import TrainConfig
from al.local import Batches, Record, Work
from al.pipeline.launch import StageProcesses, peak_rss_bytes, serve_torchrun_rank, torchrun_rank
from al.pipeline.plan import default_devices, plan
from al.pipeline.stage import END, Batch, Stage, StageRunner, move, serve, stage_context
from al.pipeline.transport import (
    CPU,
    Aborted,
    Link,
    PipelineError,
    RunState,
    comm_device,
    components_state,
    load_components_state,
    receive_thread,
    recv_object,
    run_part,
    send_object,
    send_thread,
)


class PipelineRunner:
    """What both modes share: the plan, made at the first run; feeding stage 0; recording the reports."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stages: list[Stage] | None = None
        self.threads = 1
        self.component_seconds: list[float] | None = None
        self.stats: dict = {}  # of the last run of batches: per-stage busy seconds, wall seconds, peak memory
        self.world: int | None = None  # torchrun's number of ranks

    def run(self, work: Work, batches: Batches, record: Record) -> None:
        if not work.component_trainers:
            raise ValueError("pipelining is for AL only: BP's backward pass locks every layer until the loss is known")
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return
        if self.stages is None:
            made = plan(work, self.cfg, first[1], first[2], self.world)
            self.stages, self.threads, self.component_seconds = made.stages, made.threads, made.component_seconds
        self._run(work, itertools.chain([first], batches), record)

    def _run(self, work: Work, batches: Batches, record: Record) -> None:
        raise NotImplementedError

    def _runner(self, work: Work, stage: Stage) -> StageRunner:
        last = stage.index == len(self.stages) - 1
        return StageRunner(stage, [work.component_trainers[i] for i in stage.components], work.total_steps, last)

    def _coordinate(self, run: RunState, first: StageRunner, downstream: Link, reports: Link, work: Work,
                    batches: Batches, record: Record) -> None:
        """Feed stage 0 on this thread, pass its output on, record the reports of the last stage."""
        try:
            with stage_context(first.stage, self.threads):
                for step, x, y in batches:
                    t = F.one_hot(y, work.num_classes).float()
                    try:
                        out = first.train(Batch(step, x, t, y, []))
                    except Exception as e:
                        run.fail(str(first.stage), e)
                        raise self._failure(run) from e
                    downstream.put(out)
                    self._record_reports(reports, work, record, until_end=False)
                downstream.put(END)
                self._record_reports(reports, work, record, until_end=True)
        except Aborted:
            raise self._failure(run) from None
        except BaseException:  # noqa: B036 - a callback's error (or Ctrl-C) is the caller's: stop the stages, pass it on
            run.aborted.set()
            raise

    @staticmethod
    def _record_reports(reports: Link, work: Work, record: Record, until_end: bool) -> None:
        while True:
            item = reports.get() if until_end else reports.poll()
            if item is None or item == END:
                return
            record([loss.to(work.device) for loss in item.losses])

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the stage processes this runner started (none in threads mode)."""
        return []

    def _failure(self, run: RunState) -> PipelineError:
        return run.error()

    def _record_stats(self, started: float, busy: list[float], peak_rss: list[int]) -> None:
        wall = time.perf_counter() - started
        self.stats = {
            "stages": [str(s) for s in self.stages],
            "wall_seconds": wall,
            "busy_seconds": busy,
            "idle_fraction": [max(0.0, 1 - b / wall) for b in busy] if wall > 0 else [],
            "peak_rss_bytes": peak_rss,
        }

    def close(self) -> None:
        pass


class ThreadsRunner(PipelineRunner):
    """Stages 1.. on threads of their own, bounded queues between them."""

    def _run(self, work: Work, batches: Batches, record: Record) -> None:
        stages = self.stages
        run = RunState(self.cfg.stage_timeout)
        for stage in stages:
            for i in stage.components:
                move(work.component_trainers[i], stage.device)
        inboxes = [Link(f"queue into {stage}", self.cfg.queue_depth, run) for stage in stages[1:]]
        reports = Link("reports to the trainer", 0, run)  # unbounded: the stages never wait on the trainer
        outboxes = [*inboxes, reports]
        runners = [self._runner(work, stage) for stage in stages]
        threads = [
            threading.Thread(target=run_part, args=(run, str(stage), serve, runners[k], inboxes[k - 1], outboxes[k],
                                                    self.threads), name=str(stage), daemon=True)
            for k, stage in enumerate(stages) if k > 0
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        try:
            self._coordinate(run, runners[0], outboxes[0], reports, work, batches, record)
        finally:
            run.aborted.set()  # the stages have passed END by now, or must stop
            for thread in threads:
                thread.join(timeout=self.cfg.stage_timeout)
            for trainer in work.component_trainers:
                move(trainer, str(work.device))
        self._record_stats(started, [r.busy_seconds for r in runners], [peak_rss_bytes()])


class ProcessesRunner(PipelineRunner):
    """Stage k in rank k: processes spawned on this host, or started by torchrun; torch.distributed between them."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.torchrun = torchrun_rank()
        self.world = self.torchrun and self.torchrun[1]
        self.processes: StageProcesses | None = None
        self._mid_run = False  # workers are inside a run of batches, not waiting for a command

    @property
    def is_worker(self) -> bool:
        """True in a torchrun rank > 0, which trains its stage for rank 0 and does nothing else."""
        return self.torchrun is not None and self.torchrun[0] > 0

    @property
    def worker_pids(self) -> list[int]:
        return self.processes.pids if self.processes else []

    def _run(self, work: Work, batches: Batches, record: Record) -> None:
        stages = self.stages
        if self.processes is None:
            self.processes = StageProcesses(stages, work.component_trainers, self.torchrun is not None,
                                            self.cfg.stage_timeout)
        processes = self.processes
        comm, control = comm_device(processes.backend, stages[0].device), processes.control
        run = RunState(self.cfg.stage_timeout, health=processes.check)
        self._mid_run = True
        with self._transfer_errors(run):
            for stage in stages[1:]:
                # Workers keep their state between runs; rank 0's copy, pulled at every sync, changes
                # only through the trainer's load_state_dict before fit.
                state = None if processes.hold_state else components_state(work.component_trainers, stage.components)
                send_object({"stage": stage, "stages": len(stages), "queue_depth": self.cfg.queue_depth,
                             "threads": self.threads, "total_steps": work.total_steps, "state": state},
                            stage.index, control)
        processes.hold_state = True
        for i in stages[0].components:
            move(work.component_trainers[i], stages[0].device)
        reports = Link("reports to the trainer", 0, run)
        downstream, threads = reports, []
        if len(stages) > 1:
            downstream = Link(f"queue out of {stages[0]}", self.cfg.queue_depth, run)
            threads = [send_thread(run, downstream, 1, comm, dist.group.WORLD),
                       receive_thread(run, reports, len(stages) - 1, CPU, control)]
        runner = self._runner(work, stages[0])
        started = time.perf_counter()
        self._coordinate(run, runner, downstream, reports, work, batches, record)
        for thread in threads:
            thread.join()
        busy, peak = [runner.busy_seconds], [peak_rss_bytes()]
        with self._transfer_errors(run):
            for stage in stages[1:]:
                answer = recv_object(stage.index, control)
                load_components_state(work.component_trainers, answer["state"])
                busy.append(answer["busy_seconds"])
                peak.append(answer["peak_rss_bytes"])
        self._mid_run = False
        for trainer in work.component_trainers:
            move(trainer, str(work.device))
        self._record_stats(started, busy, peak)

    @contextmanager
    def _transfer_errors(self, run: RunState):
        """A command or state transfer that fails (a gloo/NCCL error or timeout) names the stages that failed."""
        try:
            yield
        except RuntimeError as e:
            run.fail(f"{self.stages[0]}, talking to the other stages", e)
            raise self._failure(run) from e

    def _failure(self, run: RunState) -> PipelineError:
        return self.processes.failure(run) if self.processes else run.error()

    def serve(self, work: Work) -> dict:
        """A torchrun rank > 0: train this rank's stage whenever rank 0 asks, until it says stop."""
        rank, world = self.torchrun
        devices = list(self.cfg.devices or default_devices(work, world))
        serve_torchrun_rank(rank, devices, work.component_trainers, self.cfg.stage_timeout)
        return {"status": "stage worker", "rank": rank}

    def close(self) -> None:
        """End the worker processes: a stop command when they are healthy, a kill otherwise."""
        if self.processes is not None:
            self.processes.close(healthy=not self._mid_run)
        self.processes, self._mid_run = None, False


RUNNERS = {"threads": ThreadsRunner, "processes": ProcessesRunner}


def pipeline_runner(cfg: TrainConfig) -> PipelineRunner | None:
    """The runner for cfg.pipeline; None for sequential, which is the trainer's own loop."""
    return RUNNERS[cfg.pipeline](cfg) if cfg.pipeline in RUNNERS else None
