"""Jobs as the API sees them: submit (with an idempotency key), read, list, cancel, delete, count."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError

from service.store.db import Conflict, Database, QuotaExceeded, lock, new_id
from service.store.rows import STATUSES, TERMINAL, EpochRow, JobRow, ModelRow


def scoped_key(tenant: str, idempotency_key: str | None) -> str | None:
    """An idempotency key as stored: per tenant (one tenant's key says nothing of another's), and of a fixed
    length whatever the client sent."""
    if idempotency_key is None:
        return None
    return hashlib.sha256(f"{tenant}\n{idempotency_key}".encode()).hexdigest()


class Jobs(Database):
    def create_job(self, tenant: str, name: str | None, spec: dict, config: dict, idempotency_key: str | None,
                   request_hash: str | None, max_queued: int | None = None) -> tuple[JobRow, bool]:
        """The new job, trained with `config` (a RunConfig's dict), or the one the tenant created earlier with the
        same idempotency key (created=False). QuotaExceeded if the tenant has `max_queued` queued jobs already:
        counted and inserted in one transaction, so racing submissions cannot pass the quota together."""
        now = time.time()
        job_id = new_id("job_")
        key = scoped_key(tenant, idempotency_key)
        row = JobRow(
            id=job_id, tenant=tenant, name=name or job_id, spec=spec, config=config, status="queued",
            idempotency_key=key, request_hash=request_hash, epoch=0, epochs=config["training"]["epochs"],
            step=0, created_at=now, enqueued_at=now, attempts=0, releases=0,
        )
        try:
            with self.writing() as s, s.begin():
                earlier = key and s.scalars(select(JobRow).where(JobRow.idempotency_key == key)).first()
                if earlier:
                    return earlier, False
                if max_queued is not None:
                    lock(s, f"queue/{tenant}")
                    queued = s.scalar(select(func.count()).where(JobRow.tenant == tenant, JobRow.status == "queued"))
                    if queued >= max_queued:
                        raise QuotaExceeded(queued, max_queued)
                s.add(row)
            return row, True
        except IntegrityError:
            if key is None:
                raise
            with self.session() as s:  # a request with the same key committed first
                return s.scalars(select(JobRow).where(JobRow.idempotency_key == key)).one(), False

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRow | None:
        """The job; with `tenant` (as the API asks), only if it is that tenant's."""
        with self.session() as s:
            job = s.get(JobRow, job_id)
        return job if job is not None and tenant in (None, job.tenant) else None

    def list_jobs(self, tenant: str, status: str | None, limit: int, offset: int) -> tuple[list[JobRow], int]:
        mine = JobRow.tenant == tenant
        query, count = select(JobRow).where(mine), select(func.count()).where(mine)
        if status:
            query, count = query.where(JobRow.status == status), count.where(JobRow.status == status)
        with self.session() as s:
            rows = s.scalars(query.order_by(JobRow.created_at.desc(), JobRow.id).limit(limit).offset(offset))
            return list(rows), s.scalar(count)

    def job_epochs(self, job_id: str, after: int = 0) -> list[dict]:
        with self.session() as s:
            rows = s.scalars(
                select(EpochRow).where(EpochRow.job_id == job_id, EpochRow.epoch > after).order_by(EpochRow.epoch)
            )
            return [r.metrics for r in rows]

    def request_cancel(self, job_id: str) -> JobRow | None:
        """A queued job is cancelled at once; a running one is asked to stop at its next step."""
        with self.writing() as s, s.begin():
            s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                .values(status="cancelled", finished_at=time.time())
            )
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "running").values(status="cancelling"))
        return self.get_job(job_id)

    def delete_job(self, tenant: str, job_id: str) -> JobRow | None:
        """Remove a finished job and its epochs (the caller removes its directory); None if the tenant has
        no such job. Conflict while it has not finished, or while a model version it made is registered."""
        with self.writing() as s, s.begin():
            job = s.scalars(select(JobRow).where(JobRow.id == job_id, JobRow.tenant == tenant)
                            .with_for_update()).first()
            if job is None:
                return None
            if job.status not in TERMINAL:
                raise Conflict(f"job {job_id} is {job.status}; cancel it (POST /v1/jobs/{job_id}/cancel) and "
                               "delete it once it has finished")
            model = s.scalars(select(ModelRow).where(ModelRow.job_id == job_id)).first()
            if model is not None:
                raise Conflict(f"job {job_id} made model {model.name!r} version {model.version}, which is "
                               f"registered; delete it first (DELETE /v1/models/{model.name}/versions/{model.version})")
            s.execute(delete(EpochRow).where(EpochRow.job_id == job_id))
            s.delete(job)
        return job

    def count_by_status(self) -> dict[str, int]:
        with self.session() as s:
            counts = dict(s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)).all())
        return {status: counts.get(status, 0) for status in STATUSES}
