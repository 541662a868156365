"""`al worker`: a Celery worker for training jobs, with the lease reconciler beside it."""

from __future__ import annotations

import ctypes
import signal
import sys

from celery.signals import worker_process_init, worker_ready

from app.core.config import Settings
from app.store import get_store
from worker.celery_app import QUEUE, make_celery
from worker.reconcile import start_reconciler
from worker.tasks import register_tasks

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux), so no orphan keeps training a job."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_worker(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = get_store(settings.store_url)
    app = make_celery(settings)
    register_tasks(app, settings)

    @worker_process_init.connect(weak=False)
    def _pool_child_started(**_):
        die_with_parent()

    @worker_ready.connect(weak=False)
    def _start_reconciler(**_):
        start_reconciler(store, app, settings)

    app.worker_main([
        "worker", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--concurrency={settings.worker_concurrency}", "--queues", QUEUE,
    ])
