"""The FastAPI application: routes, body limits, Prometheus metrics, errors that name the problem."""

from __future__ import annotations

import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from al import __version__
from app.api.deps import Core, require
from app.api.routes import artifacts, datasets, jobs, models, studies, v2
from app.api.routes.artifacts import ARTIFACTS_PREFIX
from app.inference import ModelCache
from app.ui.routes import mount_ui
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.store import OUTAGE, get_store
from service.studies import Studies

UPLOAD_PATHS = ("/v1/datasets",)


class BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI passes it through its body parsing unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


class Metrics:
    """Request counts and latencies per route template, and jobs by status read from the store at scrape time."""

    def __init__(self, store):
        self.registry = CollectorRegistry()
        self.requests = Counter("al_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("al_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.store = store
        self.registry.register(self)

    def collect(self):
        gauge = GaugeMetricFamily("al_jobs", "jobs in the store by status", labels=["status"])
        for status, count in self.store.count_by_status().items():
            gauge.add_metric([status], count)
        yield gauge


class LimitsAndMetrics:
    """Pure ASGI (cheaper than BaseHTTPMiddleware on the predict path): caps request bodies and records metrics."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = request_limit(self.settings, path)
        started = time.perf_counter()
        status = 500
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(path, 413, too_large_message(limit))
            await response(scope, receive, send)
            return self.record(scope, 413, started)
        if path.startswith("/v2"):
            if b"inference-header-content-length" in headers:
                try:
                    scope, receive = await self.as_json(scope, receive, headers, limit)
                except (ValueError, BodyTooLarge) as e:
                    too_large = isinstance(e, BodyTooLarge)
                    code, message = (413, e.detail) if too_large else (400, f"binary tensor data: {e}")
                    await error_response(path, code, message)(scope, receive, send)
                    return self.record(scope, code, started)
            elif b"content-type" not in headers:
                # Triton's and KServe's clients send v2 JSON without a Content-Type, as their servers accept.
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body without Content-Length
                raise BodyTooLarge(limit)
            return message

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_status)
        finally:
            self.record(scope, status, started)

    @staticmethod
    async def as_json(scope, receive, headers: dict, limit: int):
        """A request in Triton's binary tensor data extension, read whole (up to `limit`) and replayed to the app
        as the JSON request it stands for."""
        header_length = headers[b"inference-header-content-length"]
        if not header_length.isdigit():
            raise ValueError("Inference-Header-Content-Length must be a number of bytes")
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise BodyTooLarge(limit)
        converted = v2.json_from_binary(body, int(header_length))
        replaced = {b"inference-header-content-length", b"content-length", b"content-type"}
        scope = {**scope, "headers": [*[(k, v) for k, v in scope["headers"] if k not in replaced],
                                      (b"content-type", b"application/json"),
                                      (b"content-length", str(len(converted)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # a disconnect, if the client goes
            sent = True
            return {"type": "http.request", "body": converted, "more_body": False}

        return scope, replay

    def record(self, scope, status: int, started: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(scope["method"], template, str(status)).inc()
        self.metrics.latency.labels(scope["method"], template).observe(time.perf_counter() - started)


def request_limit(settings: Settings, path: str) -> int:
    if path in UPLOAD_PATHS:
        return settings.max_upload_bytes
    if path.startswith(ARTIFACTS_PREFIX):  # a worker's checkpoint: 16 bytes per parameter at most (weights, Adam)
        return 16 * settings.max_parameters + settings.max_request_bytes
    return settings.max_request_bytes


def too_large_message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def error_response(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """`{"error": ...}` on the Open Inference Protocol's paths, FastAPI's `{"detail": ...}` elsewhere."""
    body = {"error": message} if path.startswith("/v2") else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error["loc"] if p != "body")
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.datasets_dir.mkdir(exist_ok=True)
    store = get_store(settings.store_url)
    model_cache = ModelCache(settings, store)
    core = Core(settings, store, make_celery(settings), model_cache, Studies(settings))
    metrics = Metrics(store)

    app = FastAPI(
        title="Associated Learning service",
        version=__version__,
        description="Train Associated Learning models as background jobs and serve their predictions "
        "(native and Open Inference Protocol v2). See docs/service.md.",
        # AL_DOCS; closed in production unless asked for: the schema tells a stranger every route there is.
        **({} if settings.docs_enabled else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )
    app.state.core = core
    # Each route decides who may call it (app/api/deps.py: require, public), next to its own code.
    app.include_router(artifacts.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(studies.router)
    app.include_router(v2.health)
    app.include_router(v2.router)
    if settings.ui:
        mount_ui(app)  # the dashboard at /ui

    @app.get("/metrics", tags=["metrics"], dependencies=[Depends(require("admin"))], response_class=Response,
             summary="Prometheus metrics: requests, latencies, jobs by status")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def store_outage(request: Request, exc: Exception):  # the database restarts or fails over
        return error_response(request.url.path, 503, "the job store does not answer; retry shortly",
                              {"Retry-After": "5"})

    for outage in OUTAGE:
        app.add_exception_handler(outage, store_outage)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status = 400 if request.url.path.startswith("/v2") else 422
        return error_response(request.url.path, status, validation_message(exc))

    app.add_middleware(LimitsAndMetrics, settings=settings, metrics=metrics)
    describe_errors_as_sent(app)
    return app


def describe_errors_as_sent(app: FastAPI) -> None:
    """OpenAPI as the handlers above answer: a 422 is `{"detail": "<message>"}` (not FastAPI's list of
    errors), and a v2 request that fails validation is a 400 `{"error": ...}`, never a 422."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema["components"]["schemas"]["HTTPValidationError"] = {
                "title": "HTTPValidationError", "type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string", "description": "what is wrong, field by field"}},
            }
            schema["components"]["schemas"].pop("ValidationError", None)
            for path, operations in schema["paths"].items():
                if path.startswith("/v2"):
                    for operation in operations.values():
                        operation["responses"].pop("422", None)
        return app.openapi_schema

    app.openapi = openapi
