"""Uploaded datasets: their rows (the files are the caller's), per tenant."""

from __future__ import annotations

from sqlalchemy import func, select

from service.store.db import Conflict, Database, QuotaExceeded, lock
from service.store.rows import ACTIVE, RUNNING, STUDY_TERMINAL, DatasetRow, JobRow, StudyRow


class Datasets(Database):
    def add_dataset(self, row: DatasetRow, quota_bytes: int) -> DatasetRow:
        """Keep a checked upload's row; QuotaExceeded if the tenant's datasets would take more than `quota_bytes`
        (summed and inserted in one transaction, so racing uploads cannot pass the quota together)."""
        with self.writing() as s, s.begin():
            lock(s, f"disk/{row.tenant}")
            used = s.scalar(select(func.coalesce(func.sum(DatasetRow.size_bytes), 0))
                            .where(DatasetRow.tenant == row.tenant))
            if used + row.size_bytes > quota_bytes:
                raise QuotaExceeded(used, quota_bytes)
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

    def datasets_with(self, digests: set[str], paths: set[str]) -> list[DatasetRow]:
        """Every tenant's datasets whose content digest or path is one of these (a worker host's cache keeps the
        copies the store still has)."""
        with self.session() as s:
            return list(s.scalars(select(DatasetRow).where(DatasetRow.sha256.in_(digests)
                                                           | DatasetRow.path.in_(paths))))

    def datasets_in_training(self) -> list[DatasetRow]:
        """The datasets that running jobs train on."""
        with self.session() as s:
            return list(s.scalars(select(DatasetRow).join(JobRow, (JobRow.tenant == DatasetRow.tenant) & (
                JobRow.spec["dataset"].as_string() == DatasetRow.id)).where(JobRow.status.in_(RUNNING)).distinct()))

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
            users += list(s.scalars(select(StudyRow.id).where(  # its next trials will need it
                StudyRow.tenant == tenant, StudyRow.status.not_in(STUDY_TERMINAL),
                StudyRow.spec["dataset"].as_string() == dataset_id).limit(5)))
            if users:
                raise Conflict(f"dataset {dataset_id} is in use by {', '.join(users)}, which have not finished; "
                               "cancel them or wait")
            s.delete(row)
        return row
