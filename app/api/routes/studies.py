"""Studies: hyperparameter searches whose trials are training jobs (service/studies.py drives them)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from al.study import SpaceError, parse_goal, parse_space
from app.api.deps import CoreDep, OffsetQuery, TrainCaller, iso
from app.api.routes.jobs import RETRY_AFTER_SECONDS, dataset_summary
from app.schemas import StudyCreate, StudyList, StudyPublic
from service.jobspec import check_fits, resolve
from service.store import STUDY_TERMINAL, QuotaExceeded, StudyRow

router = APIRouter(prefix="/v1/studies", tags=["studies"])


def study_public(core, row: StudyRow, with_importances: bool = True) -> StudyPublic:
    return StudyPublic(id=row.id, name=row.name, status=row.status, error=row.error, spec=row.spec,
                       created_at=iso(row.created_at), finished_at=iso(row.finished_at),
                       **core.studies.view(row, with_importances))


def get_study_or_404(core, study_id: str, tenant: str) -> StudyRow:
    row = core.store.get_study(study_id, tenant)
    if row is None:
        raise HTTPException(404, f"no study {study_id!r}")
    return row


@router.post("", status_code=202, response_model=StudyPublic, summary="Start a hyperparameter study",
             responses={422: {"description": "the base, the space or the objective (the bad field is named) or the "
                                             "dataset is invalid, or a trial's network would not fit the data or "
                                             "AL_MAX_PARAMETERS"},
                        429: {"description": "the tenant has AL_MAX_ACTIVE_STUDIES unfinished studies; see "
                                             "Retry-After"}})
def create_study(body: StudyCreate, response: Response, caller: TrainCaller, core: CoreDep) -> StudyPublic:
    """Each trial is a training job: the base with the trial's values at the space's paths. Workers run up to
    `parallel` trials at once; the best trial's model is registered under the study's name as it is found.
    The base and every value of the space are checked as a job's spec is (POST /v1/jobs), limits included."""
    data = dataset_summary(core, caller, body.dataset)

    def trains(spec: dict) -> None:
        check_fits(resolve(spec).config, data.input_shape, len(data.classes), core.settings.max_parameters,
                   data.input_kind)

    spec = body.model_dump(exclude_none=True)
    try:
        trains(spec["base"])
    except ValueError as e:
        raise HTTPException(422, f"base: {e}") from None
    try:
        parse_goal(spec)
        parse_space(spec["space"], spec["base"], trains)
    except SpaceError as e:
        raise HTTPException(422, str(e)) from None
    try:
        row = core.studies.create(caller.tenant, body.name, spec)
    except QuotaExceeded as e:
        raise HTTPException(429, f"tenant {caller.tenant!r} has {e.used} unfinished studies, the most "
                                 f"AL_MAX_ACTIVE_STUDIES allows ({e.limit}); retry once one has finished, or cancel "
                                 "one",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    response.headers["Location"] = f"/v1/studies/{row.id}"
    return study_public(core, row)


@router.get("", response_model=StudyList, summary="List studies, newest first")
def list_studies(
    caller: TrainCaller,
    core: CoreDep,
    limit: Annotated[int, Query(ge=1, le=100, description="page size")] = 20,
    offset: OffsetQuery = 0,
) -> StudyList:
    rows, total = core.store.list_studies(caller.tenant, limit, offset)
    return StudyList(items=[study_public(core, r, with_importances=False) for r in rows], total=total,
                     limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyPublic, summary="A study's trials, best trial and importances")
def get_study(study_id: str, caller: TrainCaller, core: CoreDep) -> StudyPublic:
    return study_public(core, get_study_or_404(core, study_id, caller.tenant))


@router.post("/{study_id}/cancel", status_code=202, response_model=StudyPublic, summary="Cancel a study",
             responses={409: {"description": "the study has already finished"}})
def cancel_study(study_id: str, caller: TrainCaller, core: CoreDep) -> StudyPublic:
    """The study becomes `cancelling` and starts no more trials; its running trials' jobs are cancelled as
    jobs are (POST /v1/jobs/{id}/cancel), and once they have stopped the study is `cancelled`."""
    row = get_study_or_404(core, study_id, caller.tenant)
    if row.status in STUDY_TERMINAL:
        raise HTTPException(409, f"study {study_id} has already {row.status}")
    return study_public(core, core.store.request_study_cancel(study_id))


@router.get("/{study_id}/events", summary="Trials as Server-Sent Events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "events `trial` (a trial "
                             "that ended, with its job's result) and a last `end` (the finished study) or "
                             "`deleted` (`{\"id\"}`: the study was deleted)"}})
async def study_events(study_id: str, caller: TrainCaller, core: CoreDep) -> EventSourceResponse:
    await run_in_threadpool(get_study_or_404, core, study_id, caller.tenant)
    poll = core.settings.events_poll_interval

    async def events():
        reported = set()
        while True:
            row = await run_in_threadpool(core.store.get_study, study_id)
            if row is None:  # deleted since the last poll
                yield {"event": "deleted", "data": json.dumps({"id": study_id})}
                return
            public = await run_in_threadpool(study_public, core, row, row.status in STUDY_TERMINAL)
            for trial in public.trials:
                if trial.state not in ("running", "waiting") and trial.number not in reported:
                    reported.add(trial.number)
                    yield {"event": "trial", "data": trial.model_dump_json()}
            if row.status in STUDY_TERMINAL:
                yield {"event": "end", "data": public.model_dump_json()}
                return
            await asyncio.sleep(poll)

    return EventSourceResponse(events())
