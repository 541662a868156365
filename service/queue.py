"""The Celery app: Redis as the broker when REDIS_URL is set, otherwise an embedded one in files.

Its settings suit long jobs (docs/service.md, "What happens when a worker dies"). The broker only carries
"train job X" messages; job state lives in the job store, so no result backend is used.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

from service.settings import Settings

TRAIN_TASK = "al.train_job"
STAGE_TASK = "al.train_stage"  # one stage of a pipeline job over several workers (worker/stages.py)


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel creates a message's file and then writes it: a consumer that takes the file in
    between reads it empty, and its worker stops for good ("Unrecoverable error: JSONDecodeError"). This one
    writes under a name that consumers skip (a leading '.') and then renames the file into place."""

    def _put(self, queue, payload, **kwargs):
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"  # kombu's own naming: consumers sort by it
        staged = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(staged, "wb") as f:
            f.write(dumps(payload).encode())
        os.replace(staged, os.path.join(self.data_folder_out, name))


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url:
        broker = settings.redis_url
        # One value everywhere (celery#5935). It matters less than usual: a redelivered message
        # for a job whose lease is live exits at once, and the lease, not this, resumes dead jobs.
        transport_options = {"visibility_timeout": settings.visibility_timeout}
    else:
        # Embedded: kombu's filesystem transport, one file per message under data_dir/broker.
        # A message taken by a worker that is then SIGKILLed is gone; the lease reconciler
        # (worker/reconcile.py) requeues such a job, so nothing depends on redelivery here.
        queue = settings.broker_dir / "queue"
        processed = settings.broker_dir / "processed"
        control = settings.broker_dir / "control"  # kombu's default is ./control in the working directory
        for folder in (queue, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        broker = "filesystem://"
        transport_options = {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(processed),
            "control_folder": str(control),
            "polling_interval": settings.broker_poll_interval,
        }
    app = Celery("al", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport_options,
        # The embedded broker's transport (the URL alone would pick kombu's own); Redis's otherwise.
        broker_transport=None if settings.redis_url else f"{__name__}:AtomicFilesystemTransport",
        result_backend_transport_options=transport_options,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        # Ack when the job ends, so a crash redelivers; requeue if the pool child is killed.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=1,  # a fresh process per job frees its (GPU) memory
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.job_soft_time_limit + 300,
        # The filesystem transport polls for broadcasts too; nobody pings an embedded worker.
        worker_enable_remote_control=bool(settings.redis_url),
    )
    return app


def enqueue(app: Celery, job_id: str, countdown: float | None = None) -> None:
    app.send_task(TRAIN_TASK, args=[job_id], queue=app.conf.task_default_queue, countdown=countdown)


def enqueue_stage(app: Celery, job_id: str, rank: int, attempt: int) -> None:
    app.send_task(STAGE_TASK, args=[job_id, rank, attempt], queue=app.conf.task_default_queue)
