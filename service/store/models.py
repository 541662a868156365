"""The model registry: one version per registered job's model, names per tenant."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.store.db import Database, lock
from service.store.rows import JobRow, ModelNameRow, ModelRow


class Models(Database):
    def register_job_model(self, tenant: str, name: str, job_id: str, publish: Callable[[str, int], str]) -> bool:
        """A finished job's model as the next version of `name`, unless it is registered already (a study's best
        trial, registered by the driver: service/studies.py)."""
        with self.writing() as s, s.begin():
            version = next_version(s, tenant, name)
            if not s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.model_name.is_(None))
                             .values(model_name=name, model_version=version)).rowcount:
                return False
            add_version(s, tenant, name, version, job_id, publish)
            return True

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
    """The next version of a model name, never one it had before (even if deleted since), which stays this
    transaction's until it ends: PostgreSQL takes an advisory lock on the name (SQLite's writers are one at a
    time already), so racing registrations wait for each other instead of taking one version twice."""
    lock(s, f"model/{tenant}/{name}")
    counter = s.get(ModelNameRow, (tenant, name))
    # A database from before the counter has only its registered versions to go by.
    registered = s.scalar(select(func.max(ModelRow.version)).where(ModelRow.tenant == tenant, ModelRow.name == name))
    version = max(counter.last_version if counter else 0, registered or 0) + 1
    if counter is None:
        s.add(ModelNameRow(tenant=tenant, name=name, last_version=version))
    else:
        counter.last_version = version
    return version


def add_version(s: Session, tenant: str, name: str, version: int, job_id: str,
                publish: Callable[[str, int], str]) -> None:
    """Register a job's model as `version` in this transaction, its files put in place by `publish`: if the
    transaction does not commit, no version was registered."""
    model = ModelRow(tenant=tenant, name=name, version=version, job_id=job_id, path="", created_at=time.time())
    s.add(model)
    s.flush()
    model.path = publish(name, version)
