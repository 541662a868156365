"""What every route needs: the service's parts, and the API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.inference import ModelCache
from service.settings import Settings
from service.store import Store
from service.studies import Studies


@dataclass
class Service:
    settings: Settings
    store: Store
    celery: Celery
    models: ModelCache
    studies: Studies


async def get_service(request: Request) -> Service:  # async: no thread-pool hop for a lookup
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
# Bounded so that no number a client sends overflows the database's 64-bit integers (a 500).
VersionPath = Annotated[int, Path(ge=1, le=2**31 - 1, description="the model version")]
OffsetQuery = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]

bearer = HTTPBearer(auto_error=False, description="one of the keys in AL_API_KEYS (when it is set)")
# The dashboard's key (app/ui/): set by its key form as an HttpOnly, SameSite=Strict cookie, so the
# dashboard's own requests, EventSource included, carry it and other sites' requests never do.
KEY_COOKIE = "al_key"


def known_key(keys: list[str], given: str) -> bool:
    # compare_digest against every key: the time taken says nothing about which key came close.
    return any([hmac.compare_digest(given.encode(), key.encode()) for key in keys])


async def require_api_key(
    request: Request, service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    keys = service.settings.keys
    if not keys:
        return
    given = credentials.credentials if credentials else request.cookies.get(KEY_COOKIE, "")
    if not known_key(keys, given):
        raise HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
