"""Stage processes: spawned here on one host, or started by torchrun across hosts; rank k trains stage k.

Rank 0 is the trainer's process. A worker (rank > 0) loads its components once, then for each
command from rank 0 trains its stage on the batches that arrive and sends back its state, until
rank 0 says stop. A worker that fails writes why into the process group's store before it dies,
and rank 0 reads it into the run's failures together with the exit codes it sees.
"""

from __future__ import annotations

import copy
import os
import pickle
import resource
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from al.local import ComponentTrainer, ComponentTrainers
from al.pipeline.stage import Stage, StageRunner, move, serve
from al.pipeline.transport import (
    CPU,
    POLL_SECONDS,
    Aborted,
    Link,
    PipelineError,
    RunState,
    StagesMissing,
    backend_for,
    comm_device,
    components_state,
    join_group,
    load_components_state,
    receive_thread,
    recv_object,
    run_part,
    send_object,
    send_thread,
)
from al.processes import die_with_parent

ERROR_KEY = "al_pipeline/error/{}"  # in the process group's store: why a worker failed
STARTED_KEY = "al_pipeline/started/{}"


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def exit_text(code: int) -> str:
    if code < 0:
        return f"process killed by {signal.Signals(-code).name}"
    return f"process exited with code {code}"


class StageProcesses:
    """The other ranks of a processes-mode run, as rank 0 sees them: their group, their health, their end."""

    def __init__(self, stages: list[Stage], trainers: ComponentTrainers, torchrun: bool, timeout: float):
        self.stages, self.timeout = stages, timeout
        self.backend = backend_for([s.device for s in stages])
        self.workers: list = []  # spawned stage processes, index k-1 for rank k
        group_timeout = timedelta(seconds=timeout)
        if torchrun:
            # rendezvous from torchrun's environment; the workers built their own components
            try:
                self.control = join_group(self.backend, stages[0].device, timeout=group_timeout)
            except RuntimeError as e:  # torch's DistStoreError: the waiting for the other ranks timed out
                raise StagesMissing(f"the other {len(stages) - 1} stage(s) did not join within {timeout:g} s: "
                                    f"{e}") from e
            self.store = dist.distributed_c10d._get_default_store()
            self.hold_state = False
            return
        world = len(stages)
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=group_timeout,
                                   wait_for_workers=False)
        context = torch.multiprocessing.get_context("spawn")
        for stage in stages[1:]:
            # Plain pickle of CPU copies: torch.multiprocessing would share the tensors' memory with the
            # child, and pickled CUDA tensors would open a context on this process's GPU in the child.
            payload = pickle.dumps({i: on_cpu(trainers[i]) for i in stage.components})
            process = context.Process(
                target=_worker_process, name=f"al {stage}", daemon=True,
                args=(stage.index, world, self.store.port, self.backend, stage.device, payload, timeout, os.getpid()),
            )
            process.start()
            self.workers.append(process)
        self.hold_state = True  # the payload carried each worker's components and optimizer state
        try:
            self._wait_started()
            self.control = join_group(self.backend, stages[0].device, store=self.store, rank=0, world_size=world,
                                      timeout=group_timeout)
        except BaseException:  # noqa: B036 - no worker outlives a start that failed
            self.kill()
            raise

    def _wait_started(self) -> None:
        """A worker that dies while starting must not leave rank 0 waiting."""
        run = RunState(self.timeout, health=self.check)
        deadline = time.monotonic() + self.timeout
        for stage in self.stages[1:]:
            while not self.store.check([STARTED_KEY.format(stage.index)]):
                try:
                    run.check()
                except Aborted:
                    raise self.failure(run) from None
                if time.monotonic() > deadline:
                    raise PipelineError(f"{stage} did not start within {self.timeout:g} s")
                time.sleep(POLL_SECONDS)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def check(self, run: RunState) -> None:
        """A run's health check: a worker process that has ended is a failure of its stage."""
        for stage, process in zip(self.stages[1:], self.workers):
            if process.exitcode is not None and not run.aborted.is_set():
                run.fail(str(stage), exit_text(process.exitcode))

    def failure(self, run: RunState) -> PipelineError:
        """The run's error, with what the workers wrote about their own failure and how they ended."""
        deadline = time.monotonic() + 2.0  # let dying workers write their cause
        while any(p.exitcode is None for p in self.workers) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        for stage in self.stages[1:]:
            key = ERROR_KEY.format(stage.index)
            if self.store.check([key]):
                run.fail(str(stage), self.store.get(key).decode())
        for stage, process in zip(self.stages[1:], self.workers):
            if process.exitcode:
                run.fail(str(stage), exit_text(process.exitcode))
        return run.error()

    def close(self, healthy: bool) -> None:
        """End the workers: a stop command when they are healthy, a kill otherwise."""
        healthy = healthy and all(p.exitcode is None for p in self.workers)
        try:
            if healthy:
                for stage in self.stages[1:]:
                    send_object(None, stage.index, self.control)
            for process in self.workers:
                process.join(timeout=10 if healthy else 0)
        except RuntimeError:
            pass  # a worker already gone: it is killed below
        finally:
            self.kill()
            dist.destroy_process_group()

    def kill(self) -> None:
        for process in self.workers:
            if process.exitcode is None:
                process.kill()
                process.join()
        self.workers = []


def on_cpu(trainer: ComponentTrainer) -> ComponentTrainer:
    trainer = copy.deepcopy(trainer)
    move(trainer, "cpu")
    return trainer


def serve_rank(rank: int, trainers: ComponentTrainers, control, timeout: float) -> None:
    """A worker process (rank > 0): for each command from rank 0, load any state, train, send the state back."""
    while True:
        command = recv_object(0, control)
        if command is None:
            return
        stage: Stage = command["stage"]
        comm = comm_device(dist.get_backend(), stage.device)
        for i in stage.components:
            move(trainers[i], stage.device)
        if command["state"] is not None:
            load_components_state(trainers, command["state"])
        last = stage.index == command["stages"] - 1
        run = RunState(timeout)
        depth = command["queue_depth"]
        inbox, outbox = Link(f"{stage} inbox", depth, run), Link(f"{stage} outbox", depth, run)
        receiving = receive_thread(run, inbox, rank - 1, comm, dist.group.WORLD)
        sending = (send_thread(run, outbox, 0, CPU, control) if last
                   else send_thread(run, outbox, rank + 1, comm, dist.group.WORLD))
        runner = StageRunner(stage, [trainers[i] for i in stage.components], command["total_steps"], last)
        run_part(run, str(stage), serve, runner, inbox, outbox, command["threads"])
        if not run.failures:  # after a failure a receiver may wait on a live peer: do not join it
            for thread in (receiving, sending):
                thread.join()
        if run.failures:
            raise PipelineError("; ".join(run.failures))
        send_object({"state": components_state(trainers, stage.components), "busy_seconds": runner.busy_seconds,
                     "peak_rss_bytes": peak_rss_bytes()}, 0, control)


def report_failure(store, rank: int, error: BaseException) -> None:
    """Tell rank 0 why this worker fails, before the group is torn down."""
    text = str(error) if isinstance(error, PipelineError) else f"{type(error).__name__}: {error}"
    store.set(ERROR_KEY.format(rank), text)


def _worker_process(rank: int, world: int, port: int, backend: str, device: str, payload: bytes,
                    timeout: float, parent: int) -> None:
    """Entry of a spawned stage process: joins the process group and serves until rank 0 says stop."""
    die_with_parent(parent)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=timeout))
    try:
        trainers = pickle.loads(payload)
        store.set(STARTED_KEY.format(rank), "1")
        control = join_group(backend, device, store=store, rank=rank, world_size=world,
                             timeout=timedelta(seconds=timeout))
        serve_rank(rank, trainers, control, timeout)
        dist.destroy_process_group()
    except BaseException as e:  # noqa: B036 - report every failure to rank 0 before dying
        report_failure(store, rank, e)
        raise SystemExit(1) from None


def serve_torchrun_rank(rank: int, devices: list[str], trainers: ComponentTrainers, timeout: float) -> None:
    """A torchrun rank > 0: train this rank's stage whenever rank 0 asks, until it says stop."""
    control = join_group(backend_for(devices), devices[rank], timeout=timedelta(seconds=timeout))
    try:
        serve_rank(rank, trainers, control, timeout)
    except BaseException as e:  # noqa: B036 - tell rank 0 why before torchrun tears the group down
        report_failure(dist.distributed_c10d._get_default_store(), rank, e)
        raise
    finally:
        dist.destroy_process_group()
