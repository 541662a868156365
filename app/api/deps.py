"""What every route needs: the service's parts, and who the caller is (tenant, scope) and may do."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.security import HTTPBearer
from starlette.requests import ClientDisconnect

from app.inference import ModelCache
from service.jobspec import NAME_PATTERN
from service.settings import ApiKey, Settings
from service.store import Store
from service.studies import Studies


class Keyring:
    """The API keys, found by token (a bearer header) or by id: what the dashboard's session holds instead of a
    key, an HMAC of it under the session's secret, which names the key to this server and to nobody else."""

    def __init__(self, keys: list[ApiKey], secret: str):
        self.keys, self.secret = keys, secret
        self.by_id = {self.id_of(key): key for key in keys}

    @classmethod
    def of(cls, settings: Settings) -> Keyring:
        """AL_API_KEYS under AL_SESSION_SECRET, or under a random secret when it is unset."""
        secret = settings.session_secret.get_secret_value() if settings.session_secret else secrets.token_urlsafe(32)
        return cls(settings.keys, secret)

    def id_of(self, key: ApiKey) -> str:
        return hmac.new(self.secret.encode(), key.token.encode(), hashlib.sha256).hexdigest()

    def find(self, token: str) -> ApiKey | None:
        return known_key(self.keys, token)


@dataclass
class Core:
    """The parts every route reaches: settings, the keys, the job store, the queue, loaded models, the study
    driver."""
    settings: Settings
    keyring: Keyring
    store: Store
    celery: Celery
    models: ModelCache
    studies: Studies


async def get_core(request: Request) -> Core:  # async: no thread-pool hop for a lookup
    return request.app.state.core


CoreDep = Annotated[Core, Depends(get_core)]
# Bounded so that no number a client sends overflows the database's 64-bit integers (a 500).
MAX_VERSION = 2**31 - 1
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="the model version")]
# An alias is named as a model is; one that is a number is refused when it is set (v2 paths read it as a version).
AliasPath = Annotated[str, Path(pattern=NAME_PATTERN, description="an alias of the model")]
OffsetQuery = Annotated[int, Query(ge=0, le=2**31 - 1, description="items to skip")]

# The key is read from the headers before the body (app/edge.py), so no route has a dependency that reads it
# (each one is a step on every request); OpenAPI shows this scheme on the paths that need a key (app/main.py).
bearer = HTTPBearer(auto_error=False, description="a key of AL_API_KEYS (when it is set)")

# What each scope may do. predict < train < admin; a worker key is for what workers on other hosts
# fetch from and store in the API's artifact store (app/api/routes/artifacts.py), and nothing else.
REACHES = {
    "predict": {"predict"},
    "train": {"predict", "train"},
    "admin": {"predict", "train", "admin"},
    "worker": {"worker"},
}


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant whose data they see, and their key's scope (never the key itself)."""

    tenant: str
    scope: str


def known_key(keys: list[ApiKey], given: str) -> ApiKey | None:
    # compare_digest against every key, no early exit: the time taken says nothing about which key came close.
    # Digests of equal length: compare_digest's time would otherwise tell a key's length.
    given_digest = hashlib.sha256(given.encode()).digest()
    matches = [key for key in keys if hmac.compare_digest(given_digest, hashlib.sha256(key.token.encode()).digest())]
    return matches[0] if matches else None


def unauthorized() -> HTTPException:
    return HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                         headers={"WWW-Authenticate": "Bearer"})


def caller_of(request: Request) -> Caller | None:
    """The caller app/edge.py found from the request's headers (a bearer key or the dashboard's session)."""
    return getattr(request.state, "caller", None)


def reaches(caller: Caller, scope: str) -> bool:
    return scope in REACHES[caller.scope]


def scope_refused(caller: Caller, scope: str) -> str:
    return f"this key's scope is {caller.scope!r}; this needs a key with scope {scope!r}" + (
        " or higher" if scope in ("predict", "train") else "")


def require(scope: str):
    """The dependency that decides who may call a route: a key whose scope reaches `scope`. Every route
    has one such decision (or `public`); tests/test_security.py finds a route without one."""

    async def caller(request: Request) -> Caller:  # its only parameter: a dependency of its own costs a step
        who = caller_of(request)
        if who is None:
            raise unauthorized()
        if request.app.state.core.settings.keys and not reaches(who, scope):  # no keys: anyone may do anything
            raise HTTPException(403, scope_refused(who, scope))
        return who

    caller.scope = scope
    return caller


async def public() -> None:
    """The decision that a route is open to anyone, with or without a key (health, the dashboard's key form)."""


public.scope = None
PredictCaller = Annotated[Caller, Depends(require("predict"))]
TrainCaller = Annotated[Caller, Depends(require("train"))]
AdminCaller = Annotated[Caller, Depends(require("admin"))]


async def body_of(request: Request) -> bytes:
    """The body of a route that reads its own (after its caller's scope is decided); a client that goes away
    before sending all of it gets the 400 FastAPI gives when it reads a body, not a server error."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the request body was all sent") from None


def remove_files(settings: Settings, path: FilePath) -> None:
    """Free the disk of a deleted dataset (a file), job or model (a directory). Only under the data
    directory: a path from the store that leads elsewhere is left alone."""
    data_dir, path = settings.data_dir.resolve(), path.resolve()
    if not path.is_relative_to(data_dir) or path == data_dir:
        return
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
