"""`al worker`: a Celery worker for training jobs, with the lease reconciler beside it."""

from __future__ import annotations

import os

import psutil
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from al.processes import die_with_parent
from service.queue import make_celery
from service.settings import Settings
from service.store import get_store
from worker.reconcile import start_reconciler
from worker.tasks import SHUTDOWN_SIGNAL, SHUTTING_DOWN, register_tasks


def run_worker(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = get_store(settings.store_url)
    app = make_celery(settings)
    register_tasks(app, settings)
    parent = os.getpid()  # the pool processes' parent: this process

    @worker_process_init.connect(weak=False)
    def _pool_child_started(**_):
        die_with_parent(parent)

    @worker_shutting_down.connect(weak=False)
    def _checkpoint_running_jobs(**_):
        SHUTTING_DOWN.set()  # pool processes forked from now on inherit it and start no job
        if "stop" in reconciler:  # a stopping worker requeues nothing
            reconciler["stop"].set()
        # A warm shutdown waits for running tasks: tell them to checkpoint now and requeue their job.
        for child in psutil.Process().children():
            try:
                child.send_signal(SHUTDOWN_SIGNAL)
            except psutil.NoSuchProcess:
                pass

    reconciler = {}

    @worker_ready.connect(weak=False)
    def _start_reconciler(**_):
        reconciler["stop"] = start_reconciler(store, app, settings)

    app.worker_main([
        "worker", "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--concurrency={settings.worker_concurrency}", "--queues", settings.queue,
    ])
