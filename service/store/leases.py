"""Jobs as the worker sees them: a lease per attempt, renewed by a heartbeat; progress and epochs written by
the lease holder only; the end of a job (and its model's registration); requeueing.

Every state change that two processes could race on is one conditional UPDATE, so it is atomic on both
databases: taking a lease, renewing it, finishing, requeueing.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import case, func, select, update

from service.store.db import Database, lock
from service.store.models import add_version, next_version
from service.store.rows import RUNNING, TERMINAL, EpochRow, JobRow
from service.store.workers import TooFewWorkers, free_slots


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """A lease taken on a job: this attempt may train it."""

    job: JobRow
    owner: str


class Leases(Database):
    def take_lease(self, job_id: str, owner: str, lease_seconds: float, workers: int = 1,
                   seen_within: float = 0.0) -> Claim | None:
        """Atomically start an attempt: only if the job is not finished and nobody holds a live lease. A job over
        `workers` > 1 workers (its stages train at once, a gang) starts only while that many slots of the workers
        seen within `seen_within` seconds are free, else TooFewWorkers: counted and taken in one transaction, so
        two such jobs never each take half the workers and wait for the other half."""
        now = time.time()
        with self.writing() as s, s.begin():
            if workers > 1:
                lock(s, "gang")
            taken = s.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.status.in_(("queued", "running", "cancelling")),
                    (JobRow.lease_expires_at.is_(None)) | (JobRow.lease_expires_at < now),
                )
                .values(
                    status=case((JobRow.status == "queued", "running"), else_=JobRow.status),
                    lease_owner=owner,
                    lease_expires_at=now + lease_seconds,
                    attempts=JobRow.attempts + 1,
                    started_at=func.coalesce(JobRow.started_at, now),
                    waiting=None,
                    rendezvous=None,
                )
            ).rowcount
            if taken and workers > 1:
                free, live = free_slots(s, seen_within, except_job=job_id)
                if free < workers:
                    raise TooFewWorkers(workers, free, live)  # the transaction rolls back: nothing was taken
        if not taken:
            return None
        with self.session() as s:
            return Claim(s.get(JobRow, job_id), owner)

    def heartbeat(self, job_id: str, owner: str, lease_seconds: float) -> str | None:
        """Renew the lease; the job's status, or None when the lease was lost to another attempt."""
        with self.writing() as s, s.begin():
            renewed = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner)
                .values(lease_expires_at=time.time() + lease_seconds)
            ).rowcount
            return s.scalar(select(JobRow.status).where(JobRow.id == job_id)) if renewed else None

    def record_progress(self, job_id: str, owner: str, **values) -> bool:
        """Progress fields, written only by the attempt holding the lease."""
        with self.writing() as s, s.begin():
            return bool(
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner).values(**values))
                .rowcount
            )

    def record_epoch(self, job_id: str, owner: str, metrics: dict) -> bool:
        """The metrics of an epoch, by the lease holder only; a resumed attempt that redoes an epoch replaces
        its row. The conditional UPDATE comes first, so a lease lost meanwhile writes nothing."""
        with self.writing() as s, s.begin():
            if not s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner)
                .values(latest_metrics=metrics, epoch=metrics["epoch"], step=0)
            ).rowcount:
                return False
            existing = s.get(EpochRow, (job_id, metrics["epoch"]))
            if existing:
                existing.metrics = metrics
            else:
                s.add(EpochRow(job_id=job_id, epoch=metrics["epoch"], metrics=metrics))
            return True

    def holds_lease(self, job_id: str, owner: str) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(func.count()).where(JobRow.id == job_id, JobRow.lease_owner == owner)))

    def finish(self, job_id: str, owner: str | None, status: str, result: dict | None = None,
               error: str | None = None, publish: Callable[[str, int], str] | None = None) -> bool:
        """End a job (only by the lease holder, when owner is given). With `publish`, the job's model is
        registered in the same transaction: `publish(name, version)` puts its files where they stay and returns
        their path, and the version exists only if the job's own conditional update succeeded."""
        with self.writing() as s, s.begin():
            condition = [JobRow.id == job_id, JobRow.status.not_in(TERMINAL)]
            if owner is not None:
                condition.append(JobRow.lease_owner == owner)
            job = s.scalars(select(JobRow).where(*condition).with_for_update()).first()
            if job is None:
                return False
            values = dict(status=status, result=result, error=error, finished_at=time.time(),
                          lease_owner=None, lease_expires_at=None, rendezvous=None, waiting=None)
            if publish is not None:
                version = next_version(s, job.tenant, job.name)
                values.update(model_name=job.name, model_version=version)
            if not s.execute(update(JobRow).where(*condition).values(**values)).rowcount:
                return False  # nothing was written
            if publish is not None:
                add_version(s, job.tenant, job.name, version, job_id, publish)
            return True

    def release(self, job_id: str, owner: str, handed_back: bool = True, waiting: str | None = None) -> str | None:
        """The lease holder gives the job back: queued again (or cancelled, if that was asked meanwhile).
        `handed_back`: the attempt ended in order (a shutdown), so it does not count towards max_attempts;
        `waiting` says why it is queued again."""
        now = time.time()
        with self.writing() as s, s.begin():
            job = s.scalars(select(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner,
                                                 JobRow.status.in_(RUNNING))).first()
            if job is None:
                return None
            new_status = "cancelled" if job.status == "cancelling" else "queued"
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner).values(
                status=new_status, lease_owner=None, lease_expires_at=None, enqueued_at=now,
                releases=JobRow.releases + int(handed_back), waiting=waiting, rendezvous=None,
                finished_at=now if new_status == "cancelled" else None,
            ))
            return new_status

    def running_job_ids(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(JobRow.id).where(JobRow.status.in_(RUNNING))))

    def expired_leases(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(
                JobRow.status.in_(RUNNING), JobRow.lease_expires_at < time.time()
            )))

    def release_expired(self, job: JobRow) -> str | None:
        """Requeue (or, if it was being cancelled, cancel) a job whose lease expired; None if someone beat us."""
        new_status = "cancelled" if job.status == "cancelling" else "queued"
        values = dict(status=new_status, lease_owner=None, lease_expires_at=None, enqueued_at=time.time(),
                      rendezvous=None)
        if new_status == "cancelled":
            values["finished_at"] = time.time()
        with self.writing() as s, s.begin():
            done = s.execute(
                update(JobRow).where(
                    JobRow.id == job.id, JobRow.status == job.status,
                    JobRow.lease_expires_at == job.lease_expires_at,
                ).values(**values)
            ).rowcount
        return new_status if done else None

    def stale_queued(self, older_than: float) -> list[str]:
        """Queued jobs whose message was sent `older_than` seconds ago and nobody took: their time is reset
        and the caller sends them again. Each job on its own: a job waiting behind others gets a duplicate
        message per period at most, which finds it taken or finished and does nothing."""
        cutoff = time.time() - older_than
        with self.writing() as s, s.begin():
            ids = list(s.scalars(select(JobRow.id).where(
                JobRow.status == "queued", JobRow.enqueued_at < cutoff, JobRow.lease_owner.is_(None)
            )))
            bumped = []
            for job_id in ids:
                if s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.enqueued_at < cutoff)
                             .values(enqueued_at=time.time())).rowcount:
                    bumped.append(job_id)
        return bumped

    def publish_rendezvous(self, job_id: str, owner: str, rendezvous: dict) -> bool:
        """Where the other stages of this attempt meet its stage 0; by the lease holder only."""
        return self.record_progress(job_id, owner, rendezvous=rendezvous)
