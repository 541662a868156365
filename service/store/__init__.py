"""The job store: jobs, datasets, the model registry, workers and studies in one SQL database (SQLite or
PostgreSQL). It is the source of truth for every job; the broker only carries "train job X" messages.

One `Store` holds every part, each in its own module: `jobs` (the API's side of jobs), `leases` (the
worker's side: attempts, progress, the end of a job), `datasets`, `models` (the registry and its aliases),
`workers` (pipeline jobs over several workers) and `studies`; `db` is the database under them, `rows` its tables.
"""

from __future__ import annotations

from service.store.datasets import Datasets
from service.store.db import OUTAGE, Conflict, Missing, QuotaExceeded, new_id, with_installed_driver
from service.store.jobs import Jobs
from service.store.leases import Claim, Leases, worker_identity
from service.store.models import Alias, Models
from service.store.rows import ACTIVE, STATUSES, STUDY_TERMINAL, TERMINAL, DatasetRow, JobRow, ModelRow, StudyRow
from service.store.studies import StudyRecords, trial_key
from service.store.workers import TooFewWorkers, Workers

__all__ = ["ACTIVE", "OUTAGE", "STATUSES", "STUDY_TERMINAL", "TERMINAL", "Alias", "Claim", "Conflict",
           "DatasetRow", "JobRow", "Missing", "ModelRow", "QuotaExceeded", "Store", "StudyRow", "TooFewWorkers",
           "get_store", "new_id", "trial_key", "with_installed_driver", "worker_identity"]


class Store(Jobs, Leases, Datasets, Models, Workers, StudyRecords):
    """The whole store: one object, its methods from each part."""


_stores: dict[str, Store] = {}


def get_store(url: str) -> Store:
    """One Store per URL per process, tables created on first use."""
    if url not in _stores:
        store = Store(url)
        store.create_tables()
        _stores[url] = store
    return _stores[url]
