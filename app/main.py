"""The FastAPI application: routes, the edge every request passes first (app/edge.py), Prometheus metrics,
errors that name the problem."""

from __future__ import annotations

import os
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.exceptions import HTTPException as StarletteHTTPException

from al import __version__
from app.api.deps import Core, Keyring, bearer, require
from app.api.routes import artifacts, datasets, jobs, models, studies, v2
from app.batching import QueueFull
from app.edge import add_edge, error_response, needs_key
from app.inference import ModelCache
from app.schemas import PredictRequest, V2InferRequest
from app.ui.routes import mount_ui
from service.queue import make_celery
from service.settings import Settings, get_settings
from service.store import OUTAGE, Store, get_store
from service.studies import Studies


class Metrics:
    """Request counts and latencies per route template, and jobs by status read from the store at scrape time.

    With PROMETHEUS_MULTIPROC_DIR set (`al serve` with several API processes: app/serve.py), prometheus-client's
    multiprocess mode: each process writes its counts to files there, and a scrape, whichever process answers
    it, sums them over every process. Jobs by status are read from the store once per scrape, never summed."""

    def __init__(self, store):
        self.registry = CollectorRegistry()  # what /metrics shows
        multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        own = None if multiprocess else self.registry  # multiprocess: the values are in the files, read from there
        self.requests = Counter("al_http_requests", "HTTP requests", ["method", "route", "status"], registry=own)
        self.latency = Histogram("al_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                                 registry=own,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        if multiprocess:
            MultiProcessCollector(self.registry)
        self.store = store
        self.registry.register(self)

    def collect(self):
        gauge = GaugeMetricFamily("al_jobs", "jobs in the store by status", labels=["status"])
        for status, count in self.store.count_by_status().items():
            gauge.add_metric([status], count)
        yield gauge


class RequestMetrics:
    """Pure ASGI (cheaper than BaseHTTPMiddleware on the predict path), outermost: every answer is counted,
    refusals at the edge included."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # the route's template
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error["loc"] if p != "body")
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(parts)


def prepare(settings: Settings) -> Store:
    """The data directory and the store with its tables: made once by `al serve` before its worker and API
    processes start, and found made by each of them."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.datasets_dir.mkdir(exist_ok=True)
    return get_store(settings.store_url)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = prepare(settings)
    model_cache = ModelCache(settings, store)
    keyring = Keyring.of(settings)
    core = Core(settings, keyring, store, make_celery(settings), model_cache, Studies(settings))
    metrics = Metrics(store)

    app = FastAPI(
        title="Associated Learning service",
        version=__version__,
        description="Train Associated Learning models as background jobs and serve their predictions "
        "(native and Open Inference Protocol v2). See docs/service.md.",
        # No OpenTelemetry (metrics are Prometheus's): asking on every request for a tracer cost ~5 % of a predict.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # AL_DOCS; closed in production unless asked for: the schema tells a stranger every route there is.
        **({} if settings.docs_enabled else {"docs_url": None, "redoc_url": None, "openapi_url": None}),
    )
    app.state.core = core
    # Each route decides who may call it (app/api/deps.py: require, public), next to its own code.
    # Routers are tried in this order for every request (their prefixes do not overlap): prediction's first.
    app.include_router(models.router)
    app.include_router(v2.health)
    app.include_router(v2.router)
    app.include_router(artifacts.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(studies.router)
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

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull):
        return error_response(request.url.path, 503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        status = 400 if request.url.path.startswith("/v2") else 422
        return error_response(request.url.path, status, validation_message(exc))

    add_edge(app, settings, keyring)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last, so it runs first: it counts every answer
    describe_errors_as_sent(app)
    return app


def describe_errors_as_sent(app: FastAPI) -> None:
    """OpenAPI as the handlers above answer: a 422 is `{"detail": "<message>"}` (not FastAPI's list of
    errors), and a v2 request that fails validation is a 400 `{"error": ...}`, never a 422; and the bearer key
    on every path that needs one (app/edge.py decides it from the path)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            schema["components"]["schemas"]["HTTPValidationError"] = {
                "title": "HTTPValidationError", "type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string", "description": "what is wrong, field by field"}},
            }
            schema["components"]["schemas"].pop("ValidationError", None)
            for body in (PredictRequest, V2InferRequest):  # read by their routes themselves: not in it yet
                described = body.model_json_schema(ref_template="#/components/schemas/{model}")
                schema["components"]["schemas"].update(described.pop("$defs", {}), **{body.__name__: described})
            schema["components"]["securitySchemes"] = {
                bearer.scheme_name: bearer.model.model_dump(mode="json", by_alias=True, exclude_none=True)}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path.startswith("/v2"):
                        operation["responses"].pop("422", None)
                    if needs_key(path):
                        operation["security"] = [{bearer.scheme_name: []}]
        return app.openapi_schema

    app.openapi = openapi
