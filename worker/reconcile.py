"""The reconciler: requeues jobs whose worker died, so they resume from their checkpoint in
seconds to minutes instead of after Redis's visibility timeout (or never, with the embedded broker),
and trims this host's copies of the artifact store's files (service/cache.py).

Every worker runs one in a thread of its main process; requeueing is a conditional UPDATE,
so when several reconcilers see the same expired lease only one of them sends the message.
Each pass also drives the studies (service/studies.py): their trials are jobs like any other.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery

from service.artifacts import CACHE_FOLDER
from service.cache import trim_cache
from service.jobspec import pipeline_workers
from service.queue import enqueue
from service.settings import Settings
from service.store import Store, worker_identity
from service.studies import Studies

log = logging.getLogger(__name__)

# Celery forks its pool processes from the thread that runs the worker while this reconciler runs
# in another: a fork in the middle of a pass would copy an open database transaction into the child.
_pass_lock = threading.Lock()
os.register_at_fork(before=_pass_lock.acquire, after_in_parent=_pass_lock.release,
                    after_in_child=_pass_lock.release)


def reconcile_once(store: Store, app: Celery, settings: Settings) -> list[str]:
    """One pass; the ids of the jobs it sent again."""
    resent = []
    free = None
    for job in store.waiting_jobs():  # pipeline jobs waiting for free workers (Store.take_lease: TooFewWorkers)
        free = store.free_slots(settings.worker_seen_within) if free is None else free
        if pipeline_workers(job.spec) <= free and store.stop_waiting(job):
            log.info("job %s: %d worker slot(s) are free; sending it again", job.id, free)
            free -= pipeline_workers(job.spec)  # one at a time into the free slots: the others wait for them
            enqueue(app, job.id)
            resent.append(job.id)
    for job in store.expired_leases():
        new_status = store.release_expired(job)
        if new_status == "queued":
            log.warning("job %s: lease of %s expired; requeued to resume from its checkpoint", job.id, job.lease_owner)
            enqueue(app, job.id)
            resent.append(job.id)
        elif new_status == "cancelled":
            log.info("job %s: lease expired while cancelling; cancelled", job.id)
    for job_id in store.stale_queued(settings.requeue_queued_after):
        if job_id in resent:
            continue
        log.warning("job %s: still queued after %.0f s; sending it again", job_id, settings.requeue_queued_after)
        enqueue(app, job_id)
        resent.append(job_id)
    if settings.artifacts_url:  # this host's copies of the artifact store's files
        trim_cache(store, settings.data_dir / CACHE_FOLDER, settings.cache_bytes, settings.lease_seconds)
    return resent


def start_reconciler(store: Store, app: Celery, settings: Settings) -> threading.Event:
    """A daemon thread that reconciles every settings.reconcile_interval seconds; set the event to stop it."""
    stop = threading.Event()
    studies = Studies(settings)
    me = worker_identity()

    def loop() -> None:
        while True:
            try:
                with _pass_lock:
                    store.worker_seen(me, settings.worker_concurrency)  # pipeline jobs count the live workers
                    reconcile_once(store, app, settings)
                    # The studies' driver: it tells Optuna of ended trials and starts new ones.
                    studies.drive(lambda job_id: enqueue(app, job_id))
            except Exception:  # the store or broker is down for a moment: try again next pass
                log.exception("reconciler pass failed")
            if stop.wait(settings.reconcile_interval):
                return

    threading.Thread(target=loop, name="al-reconciler", daemon=True).start()
    return stop
