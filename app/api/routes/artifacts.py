"""The artifact store over HTTP (service/artifacts.py): workers on other hosts fetch datasets and checkpoints
and upload checkpoints and model versions. Only a worker-scoped key may call these routes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse

from app.api.deps import Core, CoreDep, require
from service.artifacts import checked_key

ARTIFACTS_PREFIX = "/v1/artifacts/"
router = APIRouter(prefix=ARTIFACTS_PREFIX.rstrip("/"), tags=["artifacts"], dependencies=[Depends(require("worker"))])
KeyPath = Annotated[str, "datasets/..., jobs/<job>/<file> or models/<tenant>/<name>/<version>/<file>"]


def artifact_path(core: Core, key: str) -> Path:
    try:
        return core.settings.data_dir / checked_key(key)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


@router.get("/{key:path}", summary="Fetch an artifact", response_class=FileResponse,
            responses={404: {"description": "no such artifact"}})
def fetch_artifact(key: KeyPath, core: CoreDep) -> FileResponse:
    path = artifact_path(core, key)
    if not path.is_file():
        raise HTTPException(404, f"no artifact {key}")
    return FileResponse(path, media_type="application/octet-stream")


@router.put("/{key:path}", status_code=204, summary="Store an artifact (replaced atomically)",
            responses={409: {"description": "a registered model version never changes"}})
async def store_artifact(key: KeyPath, request: Request, core: CoreDep) -> None:
    path = artifact_path(core, key)
    parts = key.split("/")
    if parts[0] == "models" and len(parts) == 5 and parts[3].isdigit() and core.store.get_model(
            parts[1], parts[2], int(parts[3])) is not None:
        raise HTTPException(409, f"model {parts[2]!r} version {parts[3]} is registered, and registered versions "
                                 "never change")
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
