"""The one task: train one job, resumable, reporting through the trainer's callbacks.

A delivery first takes the job's lease in the store (atomically); a delivery that cannot
(the job finished, or another attempt holds a live lease) does nothing. So a job never
trains twice at once, however often its message is delivered.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

# Imported in the worker's main process on purpose: forked pool children then start a job
# without importing torch again. Importing torch does not initialise CUDA; only the task does.
from al.config import RunConfig
from al.data import BUILTIN_DATASETS
from al.pipeline import PipelineError, StagesMissing
from al.run import train
from al.trainer import Callback
from service.artifacts import ArtifactError, LocalArtifacts, StaleAttempt, artifacts_for
from service.jobspec import pipeline_workers
from service.queue import STAGE_TASK, TRAIN_TASK, enqueue, enqueue_stage
from service.registry import published_copy
from service.retry import Retrying
from service.settings import Settings
from service.store import OUTAGE, JobRow, Store, TooFewWorkers, get_store, worker_identity
from service.studies import trial_pruning
from worker.stages import join_as, start_stages

log = logging.getLogger(__name__)

# Warmed here for the same reason (seconds per job on a busy CPU): Adam's first construction imports
# torch._dynamo, and the built-in digits dataset comes from scikit-learn.
torch.optim.Adam([torch.zeros(1, requires_grad=True)])
importlib.import_module("sklearn.datasets")

# Sent to a pool process when its worker shuts down (worker/main.py): the job then checkpoints at
# its current step and goes back to the queue instead of holding up the shutdown. (SIGUSR1 is
# billiard's soft time limit.)
SHUTDOWN_SIGNAL = signal.SIGUSR2
SHUTTING_DOWN = threading.Event()
# A job handed back at shutdown is sent again with this delay: a worker that is shutting down may
# still receive it, and then holds it unstarted and puts it back on the queue when it stops.
REQUEUE_DELAY = 2.0


def listen_for_shutdown() -> None:
    """In the task, not at pool-process start: billiard resets the handlers after that. SIGTERM too,
    which the pool process gets when its whole process group is stopped (billiard would just exit)."""
    for signum in (SHUTDOWN_SIGNAL, signal.SIGTERM):
        signal.signal(signum, lambda *_: SHUTTING_DOWN.set())


def patient(store: Store, settings: Settings) -> Retrying:
    """The job store as a training job reaches it: each call retried through an outage (a restart, a failover)
    for up to AL_STORE_OUTAGE_SECONDS; then its error ends the attempt, and the job resumes from its checkpoint."""
    return Retrying(store, settings.store_outage_seconds, OUTAGE, "the job store")


class JobReporter(Callback):
    """Progress and epoch metrics to the store; stops the trainer on cancel, a lost lease or shutdown.

    A heartbeat thread renews the lease and reads the job's status, so the training loop
    only looks at flags between steps.
    """

    def __init__(self, store: Retrying, job_id: str, owner: str, settings: Settings):
        self.store, self.job_id, self.owner, self.settings = store, job_id, owner, settings
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._finished = threading.Event()
        self._last_write = 0.0
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)

    def _beat(self) -> None:
        while not self._finished.wait(self.settings.heartbeat_interval):
            try:  # once: the next beat is the retry, well within the lease
                status = self.store.once.heartbeat(self.job_id, self.owner, self.settings.lease_seconds)
            except Exception:
                log.exception("heartbeat of job %s failed", self.job_id)
                continue
            if status is None:
                log.warning("job %s: lease lost to another attempt; stopping", self.job_id)
                self.lease_lost.set()
            elif status == "cancelling":
                self.cancel_requested.set()

    def start_heartbeat(self) -> None:
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._finished.set()

    def on_train_start(self, trainer):
        resumed = trainer.global_step > 0  # a checkpoint was loaded
        self.store.record_progress(self.job_id, self.owner, epoch=trainer.epoch, step=trainer.step_in_epoch,
                                   steps=trainer.steps_per_epoch, resumed_from_epoch=trainer.epoch if resumed else None)
        if resumed:
            log.info("job %s resumes at epoch %d step %d", self.job_id, trainer.epoch, trainer.step_in_epoch)

    def on_step(self, trainer):
        if self.cancel_requested.is_set() or self.lease_lost.is_set() or SHUTTING_DOWN.is_set():
            trainer.request_stop()
        now = time.monotonic()
        if now - self._last_write >= self.settings.progress_interval:
            self._last_write = now
            try:  # once: progress is a hint, and training goes on; the next write catches up
                self.store.once.record_progress(self.job_id, self.owner, epoch=trainer.epoch,
                                                step=trainer.step_in_epoch)
            except OUTAGE:
                log.warning("job %s: the job store does not answer; progress not recorded", self.job_id)

    def on_epoch_end(self, trainer, metrics):
        self.store.record_epoch(self.job_id, self.owner, metrics)


def dataset_source(store: Store, artifacts: LocalArtifacts, tenant: str, dataset: str) -> str:
    if dataset in BUILTIN_DATASETS:
        return dataset
    row = store.get_dataset(tenant, dataset)
    if row is None:
        raise ValueError(f"dataset {dataset!r} no longer exists")
    return str(artifacts.dataset(row.path, row.sha256))


def starting_model_dir(store: Store, artifacts: LocalArtifacts, job: JobRow, config: RunConfig) -> Path | None:
    """The files, on this host, of the registered version a fine-tuning job starts from (its config's init_from,
    checked when the job was submitted)."""
    if config.init_from is None:
        return None
    name, version = config.init_from["model"], config.init_from["version"]
    row = store.get_model(job.tenant, name, version)
    if row is None:
        raise ValueError(f"init_from: model {name!r} version {version} no longer exists (deleted after the job was "
                         "submitted)")
    return artifacts.model(row.path, job.id)


def allow_child_processes() -> None:
    """Let the `processes` pipeline mode start its stage processes from a Celery pool process.

    Pool processes are daemonic, and multiprocessing refuses children to a daemon; their authkey is
    billiard's type, which multiprocessing's spawn refuses to pickle. The pool process still dies with
    its worker (die_with_parent); the stages end on their own when a peer stops (the timeouts in al/pipeline/).
    """
    process = multiprocessing.current_process()
    process._config["daemon"] = False
    process._config["authkey"] = multiprocessing.process.AuthenticationString(bytes(process.authkey))


@dataclass
class Outcome:
    """How an attempt ended: the job's status (None: another attempt holds the job now), its result, why."""

    status: str | None
    result: dict | None = None
    error: str | None = None
    failed_attempt: bool = False  # counts towards AL_MAX_ATTEMPTS


def run_job(store: Store, settings: Settings, job_id: str, requeue: Callable[[str], None],
            send_stage: Callable[[str, int, int], None]) -> str | None:
    """Train a job to its end (or until cancelled, or the worker shuts down: then `requeue(job_id)`); a pipeline
    job over several workers sends its other stages with `send_stage(job_id, rank, attempt)`. The status it ended
    with, or None if it was not ours to run."""
    store = patient(store, settings)
    owner = worker_identity()
    queued = store.get_job(job_id)
    try:
        claim = store.take_lease(job_id, owner, settings.lease_seconds, pipeline_workers(queued.spec) if queued else 1,
                                 settings.worker_seen_within)
    except TooFewWorkers as e:  # the reconciler sends it again once enough slots are free; this one stays free
        store.wait(job_id, str(e))
        log.info("job %s: %s", job_id, e)
        return None
    if claim is None:
        log.info("job %s is finished or held by a live lease elsewhere; this delivery does nothing", job_id)
        return None
    job = claim.job
    if job.status == "cancelling":  # cancelled while its previous attempt was dead
        outcome = Outcome("cancelled")
    elif job.attempts - job.releases > settings.max_attempts:  # a shutdown that handed it back is no failure
        outcome = Outcome("failed", error=f"gave up after {settings.max_attempts} attempts (the worker died each "
                          "time; see the worker logs)")
    else:
        log.info("job %s: attempt %d", job_id, job.attempts)
        outcome = attempt(store, settings, job, owner, send_stage)
    return settle(store, settings, job, owner, outcome, requeue)


def stored_config(job: JobRow) -> RunConfig:
    """The RunConfig the job was submitted with (checked then); ValueError if this version cannot train it."""
    if job.config is None:
        raise ValueError("the job was stored without its resolved configuration (by an older version of the "
                         "service); submit it again")
    try:
        return RunConfig.from_dict(job.config)
    except ValueError as e:
        raise ValueError(f"the job's stored configuration no longer validates: {e}; submit it again") from None


def attempt(store: Retrying, settings: Settings, job: JobRow, owner: str,
            send_stage: Callable[[str, int, int], None]) -> Outcome:
    """One attempt at training the job, which holds its lease; how it ended."""
    reporter = JobReporter(store, job.id, owner, settings)
    reporter.start_heartbeat()  # before loading the data, which can take longer than a lease
    artifacts = Retrying(artifacts_for(settings), settings.store_outage_seconds, (ArtifactError,), "the artifact store")
    study = job.spec.get("study")  # a study's trial: its pruner may stop it at an epoch's end
    pruning = None
    try:
        config = stored_config(job)
        pruning = trial_pruning(settings, study) if study else None
        source = dataset_source(store, artifacts, job.tenant, job.spec["dataset"])
        init_dir = starting_model_dir(store, artifacts, job, config)
        artifacts.pull_job(job.id)  # the latest checkpoint, from any host
        if pipeline_workers(job.spec) > 1:
            start_stages(store, settings, job, owner, send_stage)
        result = train(source, artifacts.path(f"jobs/{job.id}"), config, [reporter, *([pruning] if pruning else [])],
                       resume=True, may_save=lambda: store.holds_lease(job.id, owner),
                       saved=lambda: artifacts.push_job(job.id, owner), init_dir=init_dir)
    except SoftTimeLimitExceeded:
        return Outcome("failed", error=f"time limit of {settings.job_soft_time_limit} s exceeded")
    except StaleAttempt as e:  # another attempt holds the job now, and it reports
        log.warning("job %s: attempt %d lost its lease: %s", job.id, job.attempts, e)
        return Outcome(None)
    except StagesMissing as e:  # every worker was busy: queued again, and this attempt is no failure
        return Outcome("queued", error=f"waiting for workers: {e}")
    except PipelineError as e:  # a stage died: the attempt failed, and the job resumes from its checkpoint
        log.warning("job %s: attempt %d failed: %s", job.id, job.attempts, e)
        return Outcome("queued", error=f"attempt {job.attempts} failed, resuming from its checkpoint: {e}",
                       failed_attempt=True)
    except ValueError as e:  # DataError, ModelError, config errors: the message names the problem
        return Outcome("failed", error=str(e))
    except Exception as e:
        log.exception("job %s failed", job.id)
        return Outcome("failed", error=f"{type(e).__name__}: {e}")
    finally:
        reporter.stop_heartbeat()
    return ended_run(result, reporter, pruning)


def ended_run(result: dict, reporter: JobReporter, pruning) -> Outcome:
    """How a training run that returned ended: completed, or stopped (and why)."""
    # A study's trial may also succeed by stopping at its target (time_to_accuracy).
    succeeded = pruning.succeeded(result) if pruning else result["status"] == "completed"
    if succeeded:
        return Outcome("succeeded", result)
    if reporter.cancel_requested.is_set():
        return Outcome("cancelled", result)
    if pruning and pruning.pruned_at is not None:
        return Outcome("pruned", {**result, "pruned_at_epoch": pruning.pruned_at},
                       f"pruned by its study after epoch {pruning.pruned_at}: {pruning.reason}")
    if reporter.lease_lost.is_set():
        return Outcome(None)  # the attempt that holds the lease now reports
    return Outcome("queued", result)  # the worker is shutting down; the checkpoint holds the current step


def settle(store: Retrying, settings: Settings, job: JobRow, owner: str, outcome: Outcome,
           requeue: Callable[[str], None]) -> str | None:
    """Record how the attempt ended: the job queued again, or finished (and its model registered)."""
    status, result, error = outcome.status, outcome.result, outcome.error
    if status is None:
        return None
    if status == "queued":  # "cancelled" if that was asked meanwhile
        released = store.release(job.id, owner, not outcome.failed_attempt, waiting=error)
        if released == "queued" and error is None:  # a job that waits with a reason is the reconciler's to send
            requeue(job.id)
        if released == "queued":
            log.info("job %s: queued again (%s)", job.id, error or "worker shutting down; checkpointed")
        return released
    # A study registers only its best trial's model, under the study's name (service/studies.py).
    publish = (published_copy(artifacts_for(settings), job.id, job.tenant)
               if status == "succeeded" and not job.spec.get("study") else None)
    try:
        store.finish(job.id, owner, status, result=result, error=error, publish=publish)
    except OSError as e:  # the copy failed (a full disk): nothing was registered
        log.exception("job %s: could not register its model", job.id)
        status, error = "failed", f"could not register the model: {e}"
        store.finish(job.id, owner, status, result=result, error=error)
    log.info("job %s: %s", job.id, status)
    return status


def run_stage(store: Store, settings: Settings, job_id: str, rank: int, attempt: int) -> None:
    """Stage `rank` of a pipeline job's attempt over several workers (worker/stages.py): join its stage 0 and train
    this stage until stage 0 says stop. Stage 0's attempt does all the job's bookkeeping; this only trains."""
    store = patient(store, settings)
    job = store.get_job(job_id)
    rendezvous = job.rendezvous if job and job.status in ("running", "cancelling") else None
    if not rendezvous or rendezvous["attempt"] != attempt:
        log.info("job %s: its attempt %d is over; stage %d does nothing", job_id, attempt, rank)
        return
    artifacts = artifacts_for(settings)
    join_as(rendezvous, rank)
    scratch = settings.data_dir / "stages"  # this stage saves nothing, but train() wants a directory
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as out:
        try:
            source = dataset_source(store, artifacts, job.tenant, job.spec["dataset"])
            config = stored_config(job)  # a fine-tuning job's stages get their weights from stage 0, checked alike
            train(source, out, config, init_dir=starting_model_dir(store, artifacts, job, config))
        except Exception as e:  # stage 0 reports the attempt's failure; this worker stays up for the next job
            log.warning("job %s: stage %d of attempt %d stopped: %s", job_id, rank, attempt, e)
            return
    log.info("job %s: stage %d of attempt %d done", job_id, rank, attempt)


def register_tasks(app: Celery, settings: Settings) -> None:
    def start() -> bool:
        if SHUTTING_DOWN.is_set():  # forked by a worker already shutting down: leave the job to the next one
            return False
        # Training processes side by side share the cores rather than each spinning a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.worker_concurrency))
        return True

    @app.task(name=TRAIN_TASK, ignore_result=True)
    def train_job(job_id: str) -> None:
        if not start():
            enqueue(app, job_id, REQUEUE_DELAY)
            return
        allow_child_processes()
        listen_for_shutdown()
        run_job(get_store(settings.store_url), settings, job_id, requeue=lambda job: enqueue(app, job, REQUEUE_DELAY),
                send_stage=lambda job, rank, attempt: enqueue_stage(app, job, rank, attempt))

    # Acknowledged when it starts: a stage whose process dies is never sent again, since its attempt fails with it.
    # It does not listen for the shutdown: the worker's SHUTDOWN_SIGNAL ends it at once (the signal's default
    # action), so that a stopping worker does not wait for the whole job; stage 0 then resumes the job.
    @app.task(name=STAGE_TASK, ignore_result=True, acks_late=False, reject_on_worker_lost=False)
    def train_stage(job_id: str, rank: int, attempt: int) -> None:
        if not start():
            enqueue_stage(app, job_id, rank, attempt)
            return
        run_stage(get_store(settings.store_url), settings, job_id, rank, attempt)
