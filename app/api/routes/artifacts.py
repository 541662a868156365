"""The artifact store over HTTP (service/artifacts.py): workers on other hosts fetch datasets and checkpoints
and upload checkpoints and model versions. Only a worker-scoped key may call these routes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from app.api.deps import Core, CoreDep, require
from service.artifacts import LEASE_HEADER, ArtifactKey, parse_key

ARTIFACTS_PREFIX = "/v1/artifacts/"
router = APIRouter(prefix=ARTIFACTS_PREFIX.rstrip("/"), tags=["artifacts"], dependencies=[Depends(require("worker"))])
KeyPath = Annotated[str, "datasets/..., jobs/<job>/<file> or models/<tenant>/<name>/<version>/<file>"]


def parsed(key: str) -> ArtifactKey:
    try:
        return parse_key(key)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def artifact_path(core: Core, key: str) -> Path:
    return core.settings.data_dir / parsed(key).path


def check_writable(core: Core, key: ArtifactKey, lease: str | None) -> None:
    """A registered version's files never change; a job's files change only by the attempt that holds its lease
    (a stale attempt must not overwrite the live attempt's checkpoint)."""
    if key.model and core.store.get_model(*key.model) is not None:
        raise HTTPException(409, f"model {key.model[1]!r} version {key.model[2]} is registered, and registered "
                                 "versions never change")
    if key.job and not lease:
        raise HTTPException(428, f"a PUT into job {key.job}'s folder names the attempt that writes it: send the "
                                 f"{LEASE_HEADER} header with the attempt's lease")
    if key.job and not core.store.holds_lease(key.job, lease):
        raise HTTPException(409, f"the attempt {lease!r} does not hold job {key.job}'s lease (it ended, or another "
                                 "attempt took over): only the live attempt writes the job's files")


@router.get("/{key:path}", summary="Fetch an artifact", response_class=FileResponse,
            responses={404: {"description": "no such artifact"}})
def fetch_artifact(key: KeyPath, core: CoreDep) -> FileResponse:
    path = artifact_path(core, key)
    if not path.is_file():
        raise HTTPException(404, f"no artifact {key}")
    return FileResponse(path, media_type="application/octet-stream")


@router.put("/{key:path}", status_code=204, summary="Store an artifact (replaced atomically)",
            responses={409: {"description": "a registered model version never changes; a job's files change only "
                                            "by the attempt that holds its lease"},
                       428: {"description": f"a job's file without the {LEASE_HEADER} header"}})
async def store_artifact(key: KeyPath, request: Request, core: CoreDep,
                         lease: Annotated[str | None, Header(alias=LEASE_HEADER, max_length=255, description=(
                             "for a job's file: the lease owner of the attempt that writes it"))] = None) -> None:
    checked = parsed(key)
    await run_in_threadpool(check_writable, core, checked, lease)
    path = core.settings.data_dir / checked.path
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader (a worker resuming) sees the old file or the new one, never part of it.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
