"""Pipeline jobs over several workers: the live workers' slots, where a job's stages meet, and jobs that
wait for enough workers."""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.store.db import Database
from service.store.rows import RUNNING, JobRow, WorkerRow


class TooFewWorkers(Exception):
    """A pipeline job over several workers cannot start now: fewer worker slots are free than it has stages."""

    def __init__(self, needed: int, free: int, live: int):
        super().__init__(f"waiting for workers: its pipeline asks for {needed} (one per stage) and {max(free, 0)} of "
                         f"the {live} live worker slot(s) are free; it starts once enough are (more workers: al "
                         "worker, on any host; or ask for fewer)")
        self.needed, self.free, self.live = needed, free, live


def free_slots(s: Session, within: float, except_job: str | None = None) -> tuple[int, int]:
    """(free, live): the slots of the workers seen in the last `within` seconds, and how many of them no running
    job holds. A job holds one slot per stage (`pipeline.workers` of its spec, else one) while its lease lives."""
    now = time.time()
    live = s.scalar(select(func.coalesce(func.sum(WorkerRow.slots), 0)).where(WorkerRow.seen_at >= now - within))
    held = s.scalar(select(func.coalesce(func.sum(func.coalesce(JobRow.spec[("pipeline", "workers")].as_integer(), 1)),
                                         0)).where(JobRow.status.in_(RUNNING), JobRow.lease_expires_at >= now,
                                                   JobRow.id != (except_job or "")))
    return live - held, live


class Workers(Database):
    def worker_seen(self, worker_id: str, slots: int) -> None:
        with self.writing() as s, s.begin():
            row = s.get(WorkerRow, worker_id)
            if row is None:
                s.add(WorkerRow(id=worker_id, slots=slots, seen_at=time.time()))
            else:
                row.slots, row.seen_at = slots, time.time()

    def free_slots(self, within: float) -> int:
        """Slots of the workers seen in the last `within` seconds that no running job holds."""
        with self.writing() as s, s.begin():
            s.execute(delete(WorkerRow).where(WorkerRow.seen_at < time.time() - within - 86400))  # gone for a day
            return free_slots(s, within)[0]

    def wait(self, job_id: str, reason: str) -> None:
        """A queued job that no worker can start yet: why, for its status. The reconciler sends it again."""
        with self.writing() as s, s.begin():
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued",
                                           JobRow.lease_owner.is_(None)).values(waiting=reason))

    def waiting_jobs(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.status == "queued", JobRow.waiting.is_not(None))))

    def stop_waiting(self, job: JobRow) -> bool:
        """Claim the resend of a waiting job: one reconciler of many wins, once. The reason goes with it: the
        delivery sets a new one if the job must wait again."""
        with self.writing() as s, s.begin():
            return bool(s.execute(update(JobRow).where(
                JobRow.id == job.id, JobRow.status == "queued", JobRow.waiting == job.waiting,
            ).values(waiting=None, enqueued_at=time.time())).rowcount)
