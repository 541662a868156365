"""The database under the store: engines per process, sessions for reads and for writes, the tables'
creation and the upgrade of an older database. SQLite (the embedded default) or PostgreSQL.

Times are Unix seconds (float) so that SQLite and PostgreSQL compare them alike.
"""

from __future__ import annotations

import os
import threading
import uuid

from sqlalchemy import create_engine, event, func, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from service.settings import DEFAULT_TENANT
from service.store.rows import Base, ModelRow

# The database does not answer (restarting, failing over, unreachable): worth retrying, never a client's fault.
OUTAGE = (OperationalError, InterfaceError)


class Conflict(Exception):
    """The request contradicts the store's state (a dataset in use, a job not finished); the message says how."""


class Missing(LookupError):
    """The request names something the store does not hold (a version an alias is to point to); the message
    says what."""


class QuotaExceeded(Exception):
    """A tenant's quota would be exceeded: it uses `used` of `limit` already (what the unit is, the caller knows)."""

    def __init__(self, used: int, limit: int):
        super().__init__(f"{used} of {limit} used")
        self.used, self.limit = used, limit


def lock(s: Session, name: str) -> None:
    """Serialise this transaction with every other that locks `name`, until it ends: PostgreSQL's advisory lock
    (SQLite's writers are one at a time already). For a check and the write it allows in one transaction."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(select(func.pg_advisory_xact_lock(func.hashtext(name))))


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:20]}"


class Database:
    """Engines and sessions; the store's parts (jobs, leases, datasets, ...) run their queries through them."""

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


# Nullable columns added since the tables were first made: an older database gets them on open.
LATER_COLUMNS = {"datasets": ("sha256",), "jobs": ("waiting", "rendezvous", "config")}


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
