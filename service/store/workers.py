"""Pipeline jobs over several workers: the live workers' slots, where a job's stages meet, and jobs that
wait for enough workers."""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select, update

from service.store.db import Database
from service.store.rows import JobRow, WorkerRow


class Workers(Database):
    def worker_seen(self, worker_id: str, slots: int) -> None:
        with self.writing() as s, s.begin():
            row = s.get(WorkerRow, worker_id)
            if row is None:
                s.add(WorkerRow(id=worker_id, slots=slots, seen_at=time.time()))
            else:
                row.slots, row.seen_at = slots, time.time()

    def live_slots(self, within: float) -> int:
        """Jobs the workers seen in the last `within` seconds run at once, together."""
        with self.writing() as s, s.begin():
            cutoff = time.time() - within
            s.execute(delete(WorkerRow).where(WorkerRow.seen_at < cutoff - 86400))  # gone for a day: forget it
            return s.scalar(select(func.coalesce(func.sum(WorkerRow.slots), 0)).where(WorkerRow.seen_at >= cutoff))

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
