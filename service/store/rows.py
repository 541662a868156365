"""The store's tables. Every dataset, job, model and study belongs to a tenant (the tenant of the key that
made it); the API asks for rows by tenant, the worker by id."""

from __future__ import annotations

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.settings import DEFAULT_TENANT

TERMINAL = ("succeeded", "failed", "cancelled", "pruned")  # pruned: a study's trial its pruner stopped
ACTIVE = ("queued", "running", "cancelling")
RUNNING = ("running", "cancelling")  # an attempt holds the job (or did, until its lease expires)
STUDY_TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled", "pruned")


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


def tenant_column(primary_key: bool = False) -> Mapped[str]:
    # The server default is what an older database's rows get when the column is added (upgrade_schema).
    return mapped_column(String(64), primary_key=primary_key, server_default=DEFAULT_TENANT)


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
    spec: Mapped[dict] = mapped_column(JSON)  # as submitted
    config: Mapped[dict | None] = mapped_column(JSON)  # the RunConfig it resolved to (service/jobspec.py)
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


class EpochRow(Base):
    """One row per (job, epoch): the primary key is what keeps a resumed job's epochs unique."""

    __tablename__ = "job_epochs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    metrics: Mapped[dict] = mapped_column(JSON)


class WorkerRow(Base):
    """A worker process, as its reconciler last reported it: how many jobs it runs at once."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[float] = mapped_column(Float, index=True)


class ModelRow(Base):
    __tablename__ = "models"
    tenant: Mapped[str] = tenant_column(primary_key=True)  # model names are per tenant
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory
    created_at: Mapped[float] = mapped_column(Float)


class ModelNameRow(Base):
    """The last version number a model name was given: versions only ever grow, so a deleted version's number
    never comes back (a client pinned to it must not silently get another model)."""

    __tablename__ = "model_names"
    tenant: Mapped[str] = tenant_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class ModelAliasRow(Base):
    """One version an alias of a model name points to, with its share of the alias's requests: one row for a
    plain alias, one per version for a split (a canary). Every version named is registered (store/models.py)."""

    __tablename__ = "model_aliases"
    tenant: Mapped[str] = tenant_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    weight: Mapped[float] = mapped_column(Float)  # the alias's weights sum to 1
    updated_at: Mapped[float] = mapped_column(Float)


class StudyRow(Base):
    __tablename__ = "al_studies"  # Optuna's own tables include `studies`
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = tenant_column()  # its trial jobs and its registered model are this tenant's
    name: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON)  # dataset, base, space, trials, parallel, objective, pruner, seed
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    finished_at: Mapped[float | None] = mapped_column(Float)
    driver_until: Mapped[float | None] = mapped_column(Float)  # a driver pass holds the study until then
    seed: Mapped[int] = mapped_column(Integer)
