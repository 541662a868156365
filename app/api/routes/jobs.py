"""Training jobs: submit (202 + Location), status, list, cancel, per-epoch metrics, progress events, delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from al.checkpoint import ModelError, check_same_data, read_model_info
from al.data import BUILTIN_DATASETS, DataError, Summary, summarize
from app.api.deps import AdminCaller, Caller, Core, CoreDep, OffsetQuery, TrainCaller, iso, remove_files
from app.api.routes.datasets import dataset_kind
from app.schemas import JobList, JobMetrics, JobPublic, JobStatus, ModelRef, Progress
from service.jobspec import InitFrom, JobCreate, StartingVersion, check_fits, resolve
from service.queue import enqueue
from service.store import TERMINAL, Conflict, JobRow, QuotaExceeded

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
log = logging.getLogger(__name__)
# A full queue drains as jobs start; how fast depends on the jobs. This is when asking again is reasonable.
RETRY_AFTER_SECONDS = 30


def job_public(job: JobRow) -> JobPublic:
    metrics = dict(job.latest_metrics or {})
    for key in ("test_accuracy", "test_accuracy_by_depth"):
        if job.result and key in job.result:
            metrics[key] = job.result[key]
    return JobPublic(
        id=job.id, name=job.name, status=job.status, dataset=job.spec["dataset"], spec=job.spec,
        progress=Progress(epoch=job.epoch, epochs=job.epochs, step=job.step, steps=job.steps),
        metrics=metrics or None, error=job.error, waiting=job.waiting, attempts=job.attempts,
        resumed_from_epoch=job.resumed_from_epoch,
        created_at=iso(job.created_at), started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        model=ModelRef(name=job.model_name, version=job.model_version) if job.model_name else None,
    )


def get_job_or_404(core, caller: Caller, job_id: str) -> JobRow:
    job = core.store.get_job(job_id, caller.tenant)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def dataset_summary(core: Core, caller: Caller, dataset: str) -> Summary:
    """A job's dataset: its sample shape, classes and input kind; 422 if the caller's tenant has no such
    dataset."""
    if dataset in BUILTIN_DATASETS:
        try:
            return summarize(dataset, core.settings.max_dataset_bytes, core.settings.max_classes)
        except DataError as e:  # its files are not installed on this host
            raise HTTPException(422, str(e)) from None
    row = core.store.get_dataset(caller.tenant, dataset)
    if row is None:
        raise HTTPException(422, f"unknown dataset {dataset!r}: upload it with POST /v1/datasets "
                                 f"or use a built-in one ({', '.join(BUILTIN_DATASETS)})")
    return Summary(row.rows, tuple(row.shape), row.classes, dataset_kind(row))


def starting_version(core: Core, caller: Caller, init: InitFrom) -> StartingVersion:
    """The registered version of the caller's tenant that a fine-tuning job starts from: the one it names, or the
    one its alias points to; 422 if there is none."""
    version, lineage = init.version, {"model": init.model, "version": init.version}
    if init.alias is not None:
        alias = next((a for a in core.store.list_aliases(caller.tenant, init.model) if a.alias == init.alias), None)
        if alias is None:
            raise HTTPException(422, f"init_from: model {init.model!r} has no alias {init.alias!r}; GET "
                                     f"/v1/models/{init.model} lists its aliases")
        if len(alias.versions) > 1:
            raise HTTPException(422, f"init_from: alias {init.alias!r} of model {init.model!r} splits its requests "
                                     f"between versions {', '.join(map(str, alias.versions))}; name the version "
                                     "to start from")
        version = next(iter(alias.versions))
        lineage = {"model": init.model, "version": version, "alias": init.alias}
    row = core.store.get_model(caller.tenant, init.model, version)
    if row is None:
        raise HTTPException(422, f"init_from: no model {init.model!r} version {version}; GET /v1/models lists the "
                                 "registered ones")
    try:
        return StartingVersion(lineage, read_model_info(core.settings.data_dir / row.path).config)
    except ModelError as e:  # its files were removed or damaged on disk
        raise HTTPException(422, f"init_from: model {init.model!r} version {version} cannot be used: {e}") from None


@router.post("", status_code=202, response_model=JobPublic, summary="Submit a training job",
             responses={409: {"description": "the Idempotency-Key was used for a different spec"},
                        422: {"description": "the spec is invalid, names an unknown dataset or version to start "
                                             "from, or the dataset does not fit that version"},
                        429: {"description": "the tenant has AL_MAX_QUEUED_JOBS queued jobs; see Retry-After"}})
def create_job(
    spec: JobCreate,
    response: Response,
    caller: TrainCaller,
    core: CoreDep,
    idempotency_key: Annotated[str | None, Header(max_length=255, description="a retried POST with the same key "
                                                  "returns the job the first one created")] = None,
) -> JobPublic:
    data = dataset_summary(core, caller, spec.dataset)
    start = starting_version(core, caller, spec.init_from) if spec.init_from else None
    try:  # the fields were checked by the schema; now across fields, and the network's fit to the data
        config = resolve(spec, start).config
        check_fits(config, data.input_shape, len(data.classes), core.settings.max_parameters, data.input_kind)
    except ValueError as e:
        raise HTTPException(422, f"invalid job spec: {e}") from None
    if start is not None:
        try:
            check_same_data(start.config, data.input_kind, data.input_shape, data.classes)
        except ValueError as e:
            raise HTTPException(422, f"init_from: model {spec.init_from.model!r} version {start.lineage['version']} "
                                     f"does not fit dataset {spec.dataset!r}: {e}") from None
    spec_dict = spec.model_dump(exclude_none=True)
    request_hash = hashlib.sha256(json.dumps(spec_dict, sort_keys=True).encode()).hexdigest()
    try:
        job, created = core.store.create_job(caller.tenant, spec.name, spec_dict, config.to_dict(),
                                                idempotency_key, request_hash, core.settings.max_queued_jobs)
    except QuotaExceeded as e:
        raise HTTPException(429, f"tenant {caller.tenant!r} has {e.used} queued jobs, the most AL_MAX_QUEUED_JOBS "
                                 f"allows ({e.limit}); retry once some have started, or cancel some",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    if not created and job.request_hash != request_hash:
        raise HTTPException(409, "this Idempotency-Key was already used for a different job spec")
    if created:
        try:
            enqueue(core.celery, job.id)
        except Exception:  # the job stays queued; a worker's reconciler sends it again later
            log.exception("could not send job %s to the broker", job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(
    caller: TrainCaller,
    core: CoreDep,
    status: Annotated[JobStatus | None, Query(description="only jobs with this status")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 50,
    offset: OffsetQuery = 0,
) -> JobList:
    rows, total = core.store.list_jobs(caller.tenant, status, limit, offset)
    return JobList(items=[job_public(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, summary="A job's status, progress and latest metrics")
def get_job(job_id: str, caller: TrainCaller, core: CoreDep) -> JobPublic:
    return job_public(get_job_or_404(core, caller, job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic, summary="Cancel a job",
             responses={409: {"description": "the job has already finished"}})
def cancel_job(job_id: str, caller: TrainCaller, core: CoreDep) -> JobPublic:
    """A queued job is cancelled at once; a running one becomes `cancelling`, stops after its current
    step, saves its checkpoint and then becomes `cancelled`."""
    job = get_job_or_404(core, caller, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} has already {job.status}")
    return job_public(core.store.request_cancel(job_id))


@router.get("/{job_id}/metrics", response_model=JobMetrics, summary="Metrics of every completed epoch")
def job_metrics(job_id: str, caller: TrainCaller, core: CoreDep) -> JobMetrics:
    get_job_or_404(core, caller, job_id)
    return JobMetrics(job_id=job_id, epochs=core.store.job_epochs(job_id))


@router.get("/{job_id}/events", summary="Progress as Server-Sent Events",
            response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "events `epoch` (one per "
                             "completed epoch, with its metrics), `progress` (the job, on every change) and a "
                             "last `end` (the finished job) or `deleted` (`{\"id\"}`: the job was deleted), "
                             "after which the stream closes"}})
async def job_events(job_id: str, caller: TrainCaller, core: CoreDep) -> EventSourceResponse:
    await run_in_threadpool(get_job_or_404, core, caller, job_id)
    store, poll = core.store, core.settings.events_poll_interval

    async def events():
        last_epoch, last_seen = 0, None
        while True:
            job = await run_in_threadpool(store.get_job, job_id)
            if job is None:  # deleted since the last poll: the stream ends as it would for a finished job
                yield {"event": "deleted", "data": json.dumps({"id": job_id})}
                return
            for metrics in await run_in_threadpool(store.job_epochs, job_id, last_epoch):
                last_epoch = metrics["epoch"]
                yield {"event": "epoch", "data": json.dumps(metrics)}
            public = job_public(job)
            seen = (job.status, job.epoch, job.step)
            if job.status in TERMINAL:
                yield {"event": "end", "data": public.model_dump_json()}
                return
            if seen != last_seen:
                last_seen = seen
                yield {"event": "progress", "data": public.model_dump_json()}
            await asyncio.sleep(poll)

    return EventSourceResponse(events())


@router.delete("/{job_id}", status_code=204, summary="Delete a finished job, its metrics and its files",
               responses={409: {"description": "the job has not finished, or its model version is still registered"}})
def delete_job(job_id: str, caller: AdminCaller, core: CoreDep) -> None:
    try:
        job = core.store.delete_job(caller.tenant, job_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    remove_files(core.settings, core.settings.jobs_dir / job_id)
