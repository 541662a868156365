"""What every HTTP request meets before a route reads its body: who the caller is, the dashboard's session and
its CSRF token, the body limit, and the tenant's share of the requests in flight.

FastAPI reads and parses a body before it runs a route's dependencies, so a key checked there comes after the
body. Here, in pure ASGI middleware (BaseHTTPMiddleware would buffer the body itself), a request is refused
from its headers alone. Each route still decides which scope it needs (app/api/deps.py: `require`), and gets
the caller found here.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections import Counter
from collections.abc import MutableMapping

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from app.api.deps import Caller, Keyring, unauthorized
from app.api.routes.artifacts import ARTIFACTS_PREFIX
from service.settings import DEFAULT_TENANT, Settings

SESSION_COOKIE = "al_session"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
FORM_BYTES = 64 * 1024  # the dashboard's own forms (the key form): nothing larger goes to /ui
# Requests a tenant may have in flight at once, by kind: (kind, method, path, the setting that caps it, the
# Retry-After a refusal names). An event stream is in flight as long as it is open.
MODEL = r"/models/[^/]+(/(versions|aliases)/[^/]+)?"
CAPPED = (
    ("predict", "POST", re.compile(rf"/v1{MODEL}/predict|/v2{MODEL}/infer"), "max_concurrent_predicts", 1),
    ("upload", "POST", re.compile(r"/v1/datasets"), "max_concurrent_uploads", 10),
    ("stream", "GET", re.compile(r"/v1/(jobs|studies)/[^/]+/events"), "max_concurrent_streams", 10),
)


def add_edge(app, settings: Settings, keyring: Keyring) -> None:
    # The last added runs first: the session (which the admission reads), then the admission.
    app.add_middleware(Admission, settings=settings, keyring=keyring)
    app.add_middleware(SessionByScheme, secret=keyring.secret)


def needs_key(path: str) -> bool:
    """The API needs a key, all of it but health; the dashboard's pages show their key form instead, and its
    scripts, the docs and unknown paths under / hold no data."""
    return (path.startswith(("/v1/", "/v2")) and not path.startswith("/v2/health/")) or path == "/metrics"


def body_limit(settings: Settings, path: str) -> int:
    if path == "/v1/datasets":
        return settings.max_upload_bytes
    if path.startswith(ARTIFACTS_PREFIX):  # a worker's checkpoint: 16 bytes per parameter at most (weights, Adam)
        return 16 * settings.max_parameters + settings.max_request_bytes
    if path.startswith("/ui/"):
        return FORM_BYTES
    return settings.max_request_bytes


def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """`{"error": ...}` on the Open Inference Protocol's paths, FastAPI's `{"detail": ...}` elsewhere."""
    body = {"error": message} if path.startswith("/v2") else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI passes it through its body parsing unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


def csrf_token(session: MutableMapping) -> str:
    """The session's CSRF token (made on first use): the dashboard's pages carry it, in the key form and for
    their scripts' X-CSRF-Token header; another site's page cannot read it."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_matches(session: MutableMapping, given: str | None) -> bool:
    return bool(given) and "csrf" in session and hmac.compare_digest(given.encode(), session["csrf"].encode())


class SessionByScheme:
    """Starlette's SessionMiddleware (a cookie signed with itsdangerous), `Secure` when the request came over
    HTTPS: directly, or through a proxy whose X-Forwarded-Proto uvicorn trusts (its proxy headers, from the
    addresses in FORWARDED_ALLOW_IPS). HttpOnly and SameSite=Strict either way."""

    def __init__(self, app, secret: str):
        options = dict(secret_key=secret, session_cookie=SESSION_COOKIE, max_age=SESSION_SECONDS, same_site="strict")
        self.plain = SessionMiddleware(app, **options)
        self.secure = SessionMiddleware(app, https_only=True, **options)

    async def __call__(self, scope, receive, send):
        await (self.secure if scope.get("scheme") in ("https", "wss") else self.plain)(scope, receive, send)


class Admission:
    """Lets a request in, or refuses it from its headers: 401 without a known key on the API's paths, 403 for a
    write by the dashboard's session without its CSRF token, 413 past the path's body limit (declared, or
    counted as it streams), 429 past the tenant's requests in flight of its kind."""

    def __init__(self, app, settings: Settings, keyring: Keyring):
        self.app, self.settings, self.keyring = app, settings, keyring
        self.in_flight: Counter[tuple[str, str]] = Counter()  # (tenant, kind); on the event loop: no lock

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], Headers(scope=scope)
        caller, by_session = self.caller(scope, headers)
        scope.setdefault("state", {})["caller"] = caller
        limit = body_limit(self.settings, path)
        refusal = self.refusal(scope, headers, caller, by_session, limit)
        if refusal is not None:
            return await refusal(scope, receive, send)
        capped = next((c for c in CAPPED if c[1] == scope["method"] and c[2].fullmatch(path)), None)
        slot = (caller.tenant, capped[0]) if caller and capped else None
        if slot is not None:
            cap = getattr(self.settings, capped[3])
            if self.in_flight[slot] >= cap:
                message = (f"tenant {caller.tenant!r} has {cap} {capped[0]} requests in flight, the most "
                           f"AL_{capped[3].upper()} allows; retry when one has ended")
                return await error_response(path, 429, message, {"Retry-After": str(capped[4])})(scope, receive, send)
            self.in_flight[slot] += 1
        try:
            await self.app(scope, limited(receive, limit), send)
        finally:
            if slot is not None:
                self.in_flight[slot] -= 1

    def caller(self, scope, headers: Headers) -> tuple[Caller | None, bool]:
        """Who is asking, from a bearer key or the dashboard's session; and whether it was the session."""
        if not self.settings.keys:  # development: everyone is the default tenant's admin
            return Caller(DEFAULT_TENANT, "admin"), False
        authorization = headers.get("authorization")
        if authorization is not None:
            kind, _, token = authorization.partition(" ")
            key = self.keyring.find(token.strip()) if kind.lower() == "bearer" else None
            return (Caller(key.tenant, key.scope) if key else None), False
        key = self.keyring.by_id.get(scope.get("session", {}).get("key", ""))
        return (Caller(key.tenant, key.scope) if key else None), key is not None

    def refusal(self, scope, headers: Headers, caller: Caller | None, by_session: bool,
                limit: int) -> JSONResponse | None:
        path = scope["path"]
        if caller is None and needs_key(path):
            e = unauthorized()
            return error_response(path, e.status_code, e.detail, {**e.headers, **closing(headers)})
        if by_session and scope["method"] not in SAFE_METHODS and not csrf_matches(scope["session"],
                                                                                    headers.get(CSRF_HEADER)):
            return error_response(path, 403, "a write with the dashboard's session needs its CSRF token "
                                             f"({CSRF_HEADER} header): refused as a request from another site")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return error_response(path, 413, BodyTooLarge(limit).detail, closing(headers))
        return None


def closing(headers: Headers) -> dict[str, str]:
    """`Connection: close` for a refused request whose body is still to come: uvicorn would otherwise read the
    rest and throw it away, and a client that keeps sending costs the server that reading."""
    declared = headers.get("content-length", "0")
    return {"Connection": "close"} if not declared.isdigit() or int(declared) > 0 else {}


def limited(receive, limit: int):
    """`receive` that stops a body past `limit` bytes as it streams in (chunked, without Content-Length)."""
    received = 0

    async def receive_within_limit():
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise BodyTooLarge(limit)
        return message

    return receive_within_limit
