"""Studies' rows (al_studies): their request and status, and the turn a driver pass holds on one. Optuna keeps
the trials in its own tables of the same database (service/studies.py)."""

from __future__ import annotations

import time

from sqlalchemy import func, select, update

from service.store.db import Database, QuotaExceeded, lock
from service.store.jobs import scoped_key
from service.store.rows import STUDY_TERMINAL, JobRow, StudyRow

DRIVER_TURN_SECONDS = 60.0  # a driver pass that died frees its study after this


def trial_key(study_id: str, number: int) -> str:
    """A trial's job is found by this idempotency key: a pass that dies between asking Optuna and creating the
    job creates it on the next pass, never twice."""
    return f"study:{study_id}:{number}"


class StudyRecords(Database):
    def add_study(self, row: StudyRow, max_active: int | None = None) -> StudyRow:
        """Keep a new study; QuotaExceeded if its tenant has `max_active` unfinished studies already (counted and
        inserted in one transaction)."""
        with self.writing() as s, s.begin():
            if max_active is not None:
                lock(s, f"studies/{row.tenant}")
                active = s.scalar(select(func.count()).select_from(StudyRow).where(
                    StudyRow.tenant == row.tenant, StudyRow.status.not_in(STUDY_TERMINAL)))
                if active >= max_active:
                    raise QuotaExceeded(active, max_active)
            s.add(row)
        return row

    def get_study(self, study_id: str, tenant: str | None = None) -> StudyRow | None:
        """The study; with `tenant` (as the API asks), only if it is that tenant's."""
        with self.session() as s:
            row = s.get(StudyRow, study_id)
        return row if row is not None and tenant in (None, row.tenant) else None

    def list_studies(self, tenant: str, limit: int, offset: int) -> tuple[list[StudyRow], int]:
        mine = StudyRow.tenant == tenant
        with self.session() as s:
            rows = s.scalars(select(StudyRow).where(mine).order_by(StudyRow.created_at.desc()).limit(limit)
                             .offset(offset))
            return list(rows), s.scalar(select(func.count()).select_from(StudyRow).where(mine))

    def request_study_cancel(self, study_id: str) -> StudyRow | None:
        """The study asks for no more trials; the next driver pass cancels its running trials' jobs."""
        with self.writing() as s, s.begin():
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.status == "running")
                      .values(status="cancelling"))
        return self.get_study(study_id)

    def unfinished_studies(self) -> list[str]:
        with self.session() as s:
            return list(s.scalars(select(StudyRow.id).where(StudyRow.status.in_(("running", "cancelling")))))

    def take_study_turn(self, study_id: str) -> float | None:
        """The study is this driver pass's until it ends its turn (or DRIVER_TURN_SECONDS pass); the turn's token,
        or None if another pass holds it."""
        now = time.time()
        until = now + DRIVER_TURN_SECONDS
        with self.writing() as s, s.begin():
            taken = s.execute(update(StudyRow).where(
                StudyRow.id == study_id, StudyRow.status.in_(("running", "cancelling")),
                StudyRow.driver_until.is_(None) | (StudyRow.driver_until < now),
            ).values(driver_until=until)).rowcount
        return until if taken else None

    def end_study_turn(self, study_id: str, turn: float) -> None:
        """Free the study, if the turn is still this pass's: a pass that overran its turn must not free the study
        while the pass that took it over runs."""
        with self.writing() as s, s.begin():
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.driver_until == turn)
                      .values(driver_until=None))

    def finish_study(self, study_id: str, status: str, error: str | None = None) -> None:
        with self.writing() as s, s.begin():
            s.execute(update(StudyRow).where(StudyRow.id == study_id, StudyRow.status.not_in(STUDY_TERMINAL))
                      .values(status=status, error=error, finished_at=time.time()))

    def trial_jobs(self, study: StudyRow, numbers: list[int]) -> dict[int, JobRow]:
        """The jobs of a study's trials, by trial number (a trial whose job was deleted has none)."""
        keys = {scoped_key(study.tenant, trial_key(study.id, n)): n for n in numbers}
        with self.session() as s:
            rows = s.scalars(select(JobRow).where(JobRow.idempotency_key.in_(list(keys))))
            return {keys[job.idempotency_key]: job for job in rows}
