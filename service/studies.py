"""Studies: hyperparameter searches whose trials are ordinary training jobs.

Optuna keeps the trials in its RDB storage, in the job store's own database; the table `al_studies`
keeps each study's request and status (service/store/studies.py). The driver (`Studies.drive`, run by
every worker's reconciler) holds no state of its own: each pass reads the trials and their jobs, tells
Optuna about the jobs that ended, asks for new trials up to the budget and registers the best trial's
model. So a restarted worker, or another worker, carries on where the last pass stopped.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable

import optuna
from cachetools import LRUCache
from optuna.trial import FrozenTrial, TrialState

from al.study import (
    Goal,
    PruneAtEpochEnd,
    apply_params,
    goal_fields,
    importances,
    make_pruner,
    parse_goal,
    parse_space,
    tell,
    trial_summary,
)
from service.artifacts import artifacts_for
from service.jobspec import resolve
from service.registry import published_copy
from service.settings import Settings
from service.store import (
    OUTAGE,
    TERMINAL,
    JobRow,
    QuotaExceeded,
    Store,
    StudyRow,
    get_store,
    new_id,
    trial_key,
    with_installed_driver,
)

log = logging.getLogger(__name__)

_storages: dict[tuple[int, str], optuna.storages.RDBStorage] = {}


def optuna_storage(url: str, check_schema: bool = True) -> optuna.storages.RDBStorage:
    """One per process (a forked worker child must not share its parent's connections) and URL.
    `check_schema=False` skips creating Optuna's tables and checking their version (seconds, with alembic)."""
    key = (os.getpid(), url)
    if key not in _storages:
        engine_kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        _storages[key] = optuna.storages.RDBStorage(with_installed_driver(url), engine_kwargs=engine_kwargs,
                                                    skip_compatibility_check=not check_schema,
                                                    skip_table_creation=not check_schema)
    return _storages[key]


def trial_pruning(settings: Settings, study: dict) -> PruneAtEpochEnd:
    """The pruning callback of a trial's job, from its spec's `study` entry."""
    storage = optuna_storage(settings.store_url, check_schema=False)  # checked when the API created the study
    loaded = optuna.load_study(study_name=study["id"], storage=storage, pruner=make_pruner(study.get("pruner")))
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study["id"]), study["trial"])
    prune = (study.get("pruner") or {}).get("type") != "none"
    return PruneAtEpochEnd(optuna.trial.Trial(loaded, trial_id), parse_goal(study), prune)


def trial_job_spec(row: StudyRow, trial: FrozenTrial | optuna.Trial) -> dict:
    spec = row.spec
    return {**apply_params(spec["base"], trial.params), "dataset": spec["dataset"],
            "name": f"{row.name}.trial-{trial.number}",
            "study": {"id": row.id, "trial": trial.number, "pruner": spec.get("pruner"), **goal_fields(spec)}}


class Studies:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store = get_store(settings.store_url)
        self._importance_cache: LRUCache = LRUCache(maxsize=256)
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    @property
    def storage(self) -> optuna.storages.RDBStorage:
        """Made on first use: checking Optuna's schema takes seconds, which a service without studies never pays."""
        return optuna_storage(self.settings.store_url)

    # --- the API's side ---------------------------------------------------------------

    def create(self, tenant: str, name: str, spec: dict) -> StudyRow:
        """The new study; QuotaExceeded if the tenant has AL_MAX_ACTIVE_STUDIES unfinished ones."""
        seed = spec.get("seed") if spec.get("seed") is not None else random.randrange(2**31)
        row = StudyRow(id=new_id("study_"), tenant=tenant, name=name, spec=spec, status="running",
                       created_at=time.time(), seed=seed)
        # Optuna's study first: a driver pass may take the row as soon as it is written.
        optuna.create_study(study_name=row.id, storage=self.storage, directions=parse_goal(spec).directions)
        try:
            return self.store.add_study(row, self.settings.max_active_studies)
        except QuotaExceeded:
            optuna.delete_study(study_name=row.id, storage=self.storage)
            raise

    def view(self, row: StudyRow, with_importances: bool = True) -> dict:
        """Trials with their jobs, the best trial, a Pareto study's front, and importances once there are enough
        trials."""
        study = optuna.load_study(study_name=row.id, storage=self.storage)
        goal = parse_goal(row.spec)
        trials = study.get_trials(deepcopy=False)
        jobs = self.store.trial_jobs(row, [t.number for t in trials])
        best, front = goal.best(study), goal.front(study)
        listed = [{**trial_summary(t), **self._job_fields(jobs.get(t.number))} for t in trials]
        return {  # trials are numbered 0, 1, ... in order
            "trials": listed,
            "best": None if best is None else listed[best.number],
            "pareto": None if front is None else [listed[t.number] for t in front],
            "importances": self._importances(study) if with_importances else None,
        }

    def _importances(self, study: optuna.Study) -> dict[str, float] | None:
        """Computed once per count of complete trials (it fits a forest): a study's page polls them."""
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        key = (study.study_name, complete)
        if key not in self._importance_cache:
            self._importance_cache[key] = importances(study)
        return self._importance_cache[key]

    @staticmethod
    def _job_fields(job: JobRow | None) -> dict:
        if job is None:
            return {"job_id": None, "job_status": None, "result": None, "model": None}
        model = {"name": job.model_name, "version": job.model_version} if job.model_name else None
        return {"job_id": job.id, "job_status": job.status, "result": job.result, "model": model}

    # --- the driver: every worker's reconciler runs it ------------------------------------

    def drive(self, enqueue: Callable[[str], None]) -> None:
        """One pass over every unfinished study that no other driver holds. A study whose pass fails (but for an
        outage of the store, which the next pass outlasts) fails with the reason: its fault stays its own."""
        for study_id in self.store.unfinished_studies():
            turn = self.store.take_study_turn(study_id)
            if turn is None:
                continue
            try:
                self._drive(self.store.get_study(study_id), enqueue)
            except OUTAGE:
                raise
            except Exception as e:
                log.exception("study %s: its driver pass failed; the study fails", study_id)
                self.store.finish_study(study_id, "failed", f"the study's driver failed: {type(e).__name__}: {e}")
            finally:
                self.store.end_study_turn(study_id, turn)

    def _drive(self, row: StudyRow, enqueue: Callable[[str], None]) -> None:
        spec = row.spec
        study = optuna.load_study(study_name=row.id, storage=self.storage)
        goal = parse_goal(spec)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        jobs = self.store.trial_jobs(row, [t.number for t in running])
        still_running = 0
        for trial in running:
            job = jobs.get(trial.number)
            if job is None and row.status != "cancelling":
                job = self._start_trial(row, trial, enqueue)
            if job is None:  # it waits for room in the tenant's queue, or never will: the study is being cancelled
                if row.status == "cancelling":
                    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                else:
                    still_running += 1
                continue
            if job.status in TERMINAL:
                tell(study, trial.number, goal, job.result, job.status == "succeeded", job.status == "pruned")
                continue
            still_running += 1
            if row.status == "cancelling" and job.status != "cancelling":
                self.store.request_cancel(job.id)
        self._register_best(row, study, goal)
        if row.status == "cancelling":
            if not still_running:
                self.store.finish_study(row.id, "cancelled")
            return
        distributions = parse_space(spec["space"], spec["base"], check=lambda _: None)  # checked when created
        asked = len(study.trials)
        while asked < spec["trials"] and still_running < spec["parallel"]:
            study.sampler = optuna.samplers.TPESampler(seed=row.seed + asked)  # reproducible across passes
            job = self._start_trial(row, study.ask(distributions), enqueue)
            asked, still_running = asked + 1, still_running + 1
            if job is None:  # the tenant's queue is full: the trial's job is made on a later pass
                break
        if asked >= spec["trials"] and not still_running:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            self.store.finish_study(row.id, "succeeded" if complete else "failed",
                                    None if complete else "no trial completed: see the trials' jobs")

    def _start_trial(self, row: StudyRow, trial: FrozenTrial | optuna.Trial,
                     enqueue: Callable[[str], None]) -> JobRow | None:
        """The trial's job, queued; None while the tenant has AL_MAX_QUEUED_JOBS queued jobs (trials count as jobs):
        the trial waits for a later pass."""
        spec = trial_job_spec(row, trial)
        config = resolve(apply_params(row.spec["base"], trial.params)).config  # the space was checked at create
        try:
            job, created = self.store.create_job(row.tenant, spec["name"], spec, config.to_dict(),
                                                 trial_key(row.id, trial.number), None, self.settings.max_queued_jobs)
        except QuotaExceeded:
            log.info("study %s: trial %d waits: tenant %s's queue is full", row.id, trial.number, row.tenant)
            return None
        if created:
            enqueue(job.id)
        return job

    def _register_best(self, row: StudyRow, study: optuna.Study, goal: Goal) -> None:
        """The best trial's model (of a Pareto front, the most accurate) as the next version of the study's name,
        unless it is registered already."""
        best = goal.best(study)
        if best is None:
            return
        job = self.store.trial_jobs(row, [best.number]).get(best.number)
        if job is None or job.model_name is not None:  # its job was deleted, or its model is registered already
            return
        artifacts = artifacts_for(self.settings)
        artifacts.pull_job(job.id)  # it may have trained on another host
        self.store.register_job_model(row.tenant, row.name, job.id, published_copy(artifacts, job.id, row.tenant))
