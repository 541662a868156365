"""The job store: jobs, datasets and the model registry in one SQL database (SQLite or PostgreSQL).

It is the source of truth for every job; the broker only carries "train job X" messages.
Every dataset, job and model belongs to a tenant (the tenant of the key that made it); the API
asks for rows by tenant, the worker by id.
Every state change that two processes could race on is one conditional UPDATE, so it is
atomic on both databases: taking a lease, renewing it, finishing, requeueing.
Times are Unix seconds (float) so that SQLite and PostgreSQL compare them alike.

Over 400 lines on purpose: the three tables and every conditional UPDATE on them stay in one
file, so that a reader checks each state transition against the others in one place.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    case,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from service.settings import DEFAULT_TENANT

TERMINAL = ("succeeded", "failed", "cancelled", "pruned")  # pruned: a study's trial its pruner stopped
ACTIVE = ("queued", "running", "cancelling")
# The database does not answer (restarting, failing over, unreachable): worth retrying, never a client's fault.
OUTAGE = (OperationalError, InterfaceError)
STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled", "pruned")


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


def tenant_column(primary_key: bool = False) -> Mapped[str]:
    # The server default is what an older database's rows get when the column is added (upgrade_schema).
    return mapped_column(String(64), primary_key=primary_key, server_default=DEFAULT_TENANT)


class Conflict(Exception):
    """The request contradicts the store's state (a dataset in use, a job not finished); the message says how."""


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    rows: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list] = mapped_column(JSON)  # of one sample
    classes: Mapped[list] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str | None] = mapped_column(String(64))  # workers on other hosts cache the file by it
    created_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = tenant_column()
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[int | None] = mapped_column(Integer)
    latest_metrics: Mapped[dict | None] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    enqueued_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    releases: Mapped[int] = mapped_column(Integer, default=0)  # attempts that handed the job back in order
    resumed_from_epoch: Mapped[int | None] = mapped_column(Integer)  # the checkpoint the latest attempt began at
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(Integer)
    waiting: Mapped[str | None] = mapped_column(Text)  # why a queued job is not running yet
    # A pipeline job over several workers, while an attempt runs: where its stages meet (worker/stages.py).
    rendezvous: Mapped[dict | None] = mapped_column(JSON)


class WorkerRow(Base):
    """A worker process, as its reconciler last reported it: how many jobs it runs at once."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[float] = mapped_column(Float, index=True)


class EpochRow(Base):
    """One row per (job, epoch): the primary key is what keeps a resumed job's epochs unique."""

    __tablename__ = "job_epochs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict] = mapped_column(JSON)


class ModelRow(Base):
    __tablename__ = "models"
    tenant: Mapped[str] = tenant_column(primary_key=True)  # model names are per tenant
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    created_at: Mapped[float] = mapped_column(Float)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:20]}"


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Claim:
    """A lease taken on a job: this attempt may train it."""

    job: JobRow
    owner: str


class Store:
    def __init__(self, url: str):
        self.url = url
        self._engine: Engine | None = None
        self._read_engine: Engine | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    # Engines per process: a forked Celery child must not reuse its parent's connections.
    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._pid != os.getpid():
                for engine in {self._engine, self._read_engine} - {None}:
                    engine.dispose(close=False)
                sqlite = self.url.startswith("sqlite")
                self._engine = _make_engine(self.url, write=True)
                self._read_engine = _make_engine(self.url, write=False) if sqlite else self._engine
                self._writes = sessionmaker(self._engine, expire_on_commit=False)
                self._reads = sessionmaker(self._read_engine, expire_on_commit=False)
                self._pid = os.getpid()
            return self._engine

    def session(self) -> Session:
        """For reads: on SQLite they take no lock, so they never hold up a writer."""
        self.engine  # noqa: B018 - makes sure this process has its own engines
        return self._reads()

    def writing(self) -> Session:
        """For transactions that write (on SQLite they take the write lock when they begin)."""
        self.engine  # noqa: B018
        return self._writes()

    def create_tables(self) -> None:
        """The tables, and an older database's brought up to date."""
        for attempt in range(2):
            try:
                Base.metadata.create_all(self.engine)
                with self.engine.begin() as conn:
                    upgrade_schema(conn)
                return
            except (OperationalError, ProgrammingError, IntegrityError):
                if attempt:  # the first failure: another process created or upgraded them at the same moment
                    raise

    def ping(self) -> bool:
        try:
            with self.session() as s:
                s.execute(select(1))
            return True
        except Exception:
            return False

    # --- datasets -------------------------------------------------------------------

    def add_dataset(self, row: DatasetRow) -> DatasetRow:
        with self.writing() as s, s.begin():
            s.add(row)
        return row

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRow | None:
        with self.session() as s:
            return s.scalars(select(DatasetRow).where(DatasetRow.id == dataset_id, DatasetRow.tenant == tenant)).first()

    def list_datasets(self, tenant: str, limit: int, offset: int) -> tuple[list[DatasetRow], int]:
        with self.session() as s:
            total = s.scalar(select(func.count()).where(DatasetRow.tenant == tenant))
            rows = s.scalars(select(DatasetRow).where(DatasetRow.tenant == tenant)
                             .order_by(DatasetRow.created_at.desc()).limit(limit).offset(offset))
            return list(rows), total

    def dataset_bytes(self, tenant: str) -> int:
        """What a tenant's uploads take on disk (its disk quota counts these)."""
        with self.session() as s:
            return s.scalar(select(func.coalesce(func.sum(DatasetRow.size_bytes), 0))
                            .where(DatasetRow.tenant == tenant))

    def delete_dataset(self, tenant: str, dataset_id: str) -> DatasetRow | None:
        """Remove a dataset's row (the caller removes its file); None if the tenant has no such dataset.
        Conflict while a job that has not finished trains on it."""
        with self.writing() as s, s.begin():
            row = s.scalars(select(DatasetRow).where(DatasetRow.id == dataset_id, DatasetRow.tenant == tenant)
                            .with_for_update()).first()
            if row is None:
                return None
            users = list(s.scalars(select(JobRow.id).where(
                JobRow.tenant == tenant, JobRow.status.in_(ACTIVE), JobRow.spec["dataset"].as_string() == dataset_id
            ).limit(5)))
            if users:
                raise Conflict(f"dataset {dataset_id} is in use by job(s) {', '.join(users)}, which have not "
                               "finished; cancel them or wait")
            s.delete(row)
        return row

    # --- jobs: the API's side ---------------------------------------------------------

    def create_job(
        self, tenant: str, name: str | None, spec: dict, epochs: int, idempotency_key: str | None,
        request_hash: str | None,
    ) -> tuple[JobRow, bool]:
        """The new job, or the one created earlier with the same idempotency key (created=False)."""
        now = time.time()
        job_id = new_id("job_")
        row = JobRow(
            id=job_id, tenant=tenant, name=name or job_id, spec=spec, status="queued", idempotency_key=idempotency_key,
            request_hash=request_hash, epoch=0, epochs=epochs, step=0, created_at=now, enqueued_at=now, attempts=0,
            releases=0,
        )
        try:
            with self.writing() as s, s.begin():
                s.add(row)
            return row, True
        except IntegrityError:
            if idempotency_key is None:
                raise
            with self.session() as s:
                earlier = s.scalars(select(JobRow).where(JobRow.idempotency_key == idempotency_key)).one()
            if earlier.tenant != tenant:  # keys are unique across tenants; say nothing of the other one's job
                raise Conflict("this Idempotency-Key is taken; send another (a random UUID)") from None
            return earlier, False

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

    def queued_jobs(self, tenant: str) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).where(JobRow.tenant == tenant, JobRow.status == "queued"))

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

    # --- jobs: the worker's side ------------------------------------------------------

    def take_lease(self, job_id: str, owner: str, lease_seconds: float) -> Claim | None:
        """Atomically start an attempt: only if the job is not finished and nobody holds a live lease."""
        now = time.time()
        with self.writing() as s, s.begin():
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
        if not taken:
            return None
        return Claim(self.get_job(job_id), owner)

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
                                                 JobRow.status.in_(("running", "cancelling")))).first()
            if job is None:
                return None
            new_status = "cancelled" if job.status == "cancelling" else "queued"
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == owner).values(
                status=new_status, lease_owner=None, lease_expires_at=None, enqueued_at=now,
                releases=JobRow.releases + int(handed_back), waiting=waiting, rendezvous=None,
                finished_at=now if new_status == "cancelled" else None,
            ))
            return new_status

    def expired_leases(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(
                JobRow.status.in_(("running", "cancelling")), JobRow.lease_expires_at < time.time()
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

    # --- pipeline jobs over several workers ---------------------------------------------

    def publish_rendezvous(self, job_id: str, owner: str, rendezvous: dict) -> bool:
        """Where the other stages of this attempt meet its stage 0; by the lease holder only."""
        return self.record_progress(job_id, owner, rendezvous=rendezvous)

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

    # --- models -------------------------------------------------------------------------

    def list_models(self, tenant: str, name: str | None = None) -> list[ModelRow]:
        query = select(ModelRow).where(ModelRow.tenant == tenant).order_by(ModelRow.name, ModelRow.version)
        if name is not None:
            query = query.where(ModelRow.name == name)
        with self.session() as s:
            return list(s.scalars(query))

    def get_model(self, tenant: str, name: str, version: int | None = None) -> ModelRow | None:
        query = select(ModelRow).where(ModelRow.tenant == tenant, ModelRow.name == name)
        query = query.where(ModelRow.version == version) if version is not None else query.order_by(
            ModelRow.version.desc()
        )
        with self.session() as s:
            return s.scalars(query.limit(1)).first()

    def delete_model(self, tenant: str, name: str, version: int) -> ModelRow | None:
        """Unregister a model version (the caller removes its directory); None if the tenant has no such one."""
        with self.writing() as s, s.begin():
            row = s.get(ModelRow, (tenant, name, version))
            if row is not None:
                s.delete(row)
        return row


def next_version(s: Session, tenant: str, name: str) -> int:
    """The next version of a model name, which stays this transaction's until it ends: PostgreSQL takes an
    advisory lock on the name (SQLite's writers are one at a time already), so racing registrations wait
    for each other instead of taking one version twice."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"{tenant}/{name}"))))
    latest = s.scalar(select(func.max(ModelRow.version)).where(ModelRow.tenant == tenant, ModelRow.name == name))
    return (latest or 0) + 1


def add_version(s: Session, tenant: str, name: str, version: int, job_id: str,
                publish: Callable[[str, int], str]) -> None:
    """Register a job's model as `version` in this transaction, its files put in place by `publish`: if the
    transaction does not commit, no version was registered."""
    model = ModelRow(tenant=tenant, name=name, version=version, job_id=job_id, path="", created_at=time.time())
    s.add(model)
    s.flush()
    model.path = publish(name, version)


# Nullable columns added since the tables were first made: an older database gets them on open.
LATER_COLUMNS = {"datasets": ("sha256",), "jobs": ("waiting", "rendezvous")}


def upgrade_schema(conn) -> None:
    """An older database brought up to date: the later columns; and, for one made before tenants, the tenant
    columns, so that every row it holds is the default tenant's, and the tenant in the models' key. SQLite
    cannot change a key, so it copies the table."""
    schema = inspect(conn)
    for table, names in LATER_COLUMNS.items():
        present = {c["name"] for c in schema.get_columns(table)}
        for name in set(names) - present:
            kind = Base.metadata.tables[table].c[name].type.compile(conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
    if "tenant" in {c["name"] for c in schema.get_columns("models")}:
        return  # the models table is upgraded last: with it, everything is
    column = f"tenant VARCHAR(64) NOT NULL DEFAULT '{DEFAULT_TENANT}'"
    for table in ("datasets", "jobs"):
        if "tenant" not in {c["name"] for c in schema.get_columns(table)}:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column}")
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("ALTER TABLE models RENAME TO models_before_tenants")
        ModelRow.__table__.create(conn)
        conn.exec_driver_sql(f"INSERT INTO models (tenant, name, version, job_id, path, created_at) SELECT "
                             f"'{DEFAULT_TENANT}', name, version, job_id, path, created_at FROM models_before_tenants")
        conn.exec_driver_sql("DROP TABLE models_before_tenants")
    else:
        conn.exec_driver_sql(f"ALTER TABLE models ADD COLUMN {column}")
        conn.exec_driver_sql(f"ALTER TABLE models DROP CONSTRAINT {schema.get_pk_constraint('models')['name']}")
        conn.exec_driver_sql("ALTER TABLE models ADD PRIMARY KEY (tenant, name, version)")


def _make_engine(url: str, write: bool) -> Engine:
    if url.startswith("sqlite"):
        # No pool: a process holds no SQLite connection between sessions, so a Celery pool process
        # forked meanwhile cannot inherit SQLite's in-process lock state (the lock would never be freed).
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            # WAL: readers never block the writer; several processes share the file.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.isolation_level = None  # transactions begin below, not in the driver

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # Writers take the write lock up front: a read-then-write transaction could otherwise fail
            # with SQLITE_BUSY, without waiting, when another process wrote in between.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(with_installed_driver(url), pool_pre_ping=True)


def with_installed_driver(url: str) -> str:
    """`postgresql://` (and Heroku-style `postgres://`), the form platforms hand out, with the driver this
    project installs: SQLAlchemy 2.1 would otherwise pick psycopg 3, which is not installed."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme in ("postgresql", "postgres") else url


_stores: dict[str, Store] = {}


def get_store(url: str) -> Store:
    """One Store per URL per process, tables created on first use."""
    if url not in _stores:
        store = Store(url)
        store.create_tables()
        _stores[url] = store
    return _stores[url]
