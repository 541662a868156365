"""The model registry: one version per registered job's model, names per tenant; and the names' aliases."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.store.db import Conflict, Database, Missing, lock
from service.store.rows import JobRow, ModelAliasRow, ModelNameRow, ModelRow


class Alias(NamedTuple):
    """An alias of a model name: the versions it points to, each with its share of the alias's requests."""

    name: str
    alias: str
    versions: dict[int, float]  # the largest share first
    updated_at: float


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
        """Unregister a model version (the caller removes its directory); None if the tenant has no such one.
        Conflict while an alias points to it."""
        with self.writing() as s, s.begin():
            lock(s, f"model/{tenant}/{name}")  # an alias being pointed to it meanwhile waits (set_alias)
            row = s.get(ModelRow, (tenant, name, version))
            if row is None:
                return None
            aliases = list(s.scalars(select(ModelAliasRow.alias).where(
                ModelAliasRow.tenant == tenant, ModelAliasRow.name == name, ModelAliasRow.version == version
            ).order_by(ModelAliasRow.alias)))
            if aliases:
                raise Conflict(f"model {name!r} version {version} is in use by alias{'es' * (len(aliases) > 1)} "
                               f"{', '.join(map(repr, aliases))}; point it elsewhere or delete it first "
                               f"(PUT or DELETE /v1/models/{name}/aliases/{aliases[0]})")
            s.delete(row)
        return row

    def set_alias(self, tenant: str, name: str, alias: str, versions: dict[int, float]) -> Alias:
        """Point `alias` of `name` at `versions` (each with its share of the requests), in place of what it
        pointed to. Missing, and nothing changes, if the name has no such version."""
        with self.writing() as s, s.begin():
            lock(s, f"model/{tenant}/{name}")  # a delete of one of the versions meanwhile waits (delete_model)
            registered = set(s.scalars(select(ModelRow.version).where(
                ModelRow.tenant == tenant, ModelRow.name == name, ModelRow.version.in_(list(versions)))))
            missing = sorted(set(versions) - registered)
            if missing:
                raise Missing(f"model {name!r} has no version {', '.join(map(str, missing))}")
            s.execute(delete(ModelAliasRow).where(ModelAliasRow.tenant == tenant, ModelAliasRow.name == name,
                                                  ModelAliasRow.alias == alias))
            now = time.time()
            s.add_all([ModelAliasRow(tenant=tenant, name=name, alias=alias, version=version, weight=weight,
                                     updated_at=now) for version, weight in versions.items()])
        return Alias(name, alias, dict(sorted(versions.items(), key=lambda item: (-item[1], item[0]))), now)

    def delete_alias(self, tenant: str, name: str, alias: str) -> bool:
        """Remove an alias; False if the tenant's name has no such alias."""
        with self.writing() as s, s.begin():
            return bool(s.execute(delete(ModelAliasRow).where(
                ModelAliasRow.tenant == tenant, ModelAliasRow.name == name, ModelAliasRow.alias == alias)).rowcount)

    def list_aliases(self, tenant: str, name: str | None = None) -> list[Alias]:
        """The tenant's aliases (of one name, or of all), by name and alias."""
        query = select(ModelAliasRow).where(ModelAliasRow.tenant == tenant).order_by(
            ModelAliasRow.name, ModelAliasRow.alias, ModelAliasRow.weight.desc(), ModelAliasRow.version)
        if name is not None:
            query = query.where(ModelAliasRow.name == name)
        aliases: dict[tuple[str, str], Alias] = {}
        with self.session() as s:
            for row in s.scalars(query):
                aliases.setdefault((row.name, row.alias), Alias(row.name, row.alias, {}, row.updated_at)).versions[
                    row.version] = row.weight
        return list(aliases.values())


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
