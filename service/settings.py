"""The service's settings: one object, read from environment variables once per process."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TENANT = "default"
# What each scope may do is app/api/deps.py's (REACHES); here only which names exist.
SCOPES = ("predict", "train", "admin", "worker")
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # it names a directory too


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), not every core the
    machine has. A CPU quota (docker --cpus) does not show here: set AL_WEB_WORKERS under one."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class ApiKey:
    token: str = field(repr=False)  # never in a repr, so never in a log line or a traceback
    scope: str
    tenant: str


def parse_api_keys(text: str) -> list[ApiKey]:
    """`TOKEN` (an admin key of the default tenant), `TOKEN:SCOPE` or `TOKEN:SCOPE:TENANT`, comma-separated.
    Errors name an entry by its position and never quote it: it may hold a token."""
    keys: dict[str, ApiKey] = {}
    entries = [e.strip() for e in text.split(",")]
    for position, entry in enumerate(entries, 1):
        if not entry:
            continue  # "a, b," as before
        where = f"AL_API_KEYS entry {position}"
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) > 3:
            raise ValueError(f"{where}: use TOKEN, TOKEN:SCOPE or TOKEN:SCOPE:TENANT (a token has no ':')")
        token, scope, tenant = parts + ["admin", DEFAULT_TENANT][len(parts) - 1:]
        if not token:
            raise ValueError(f"{where}: the token is empty")
        if scope not in SCOPES:
            raise ValueError(f"{where}: the scope must be one of {', '.join(SCOPES)}")
        if not TENANT_PATTERN.fullmatch(tenant):
            raise ValueError(f"{where}: a tenant is 1 to 64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if token in keys:
            raise ValueError(f"{where}: its token is also in an earlier entry")
        keys[token] = ApiKey(token, scope, tenant)
    return list(keys.values())


class Settings(BaseSettings):
    # hide_input: a validation error never prints the values (AL_API_KEYS holds secrets)
    model_config = SettingsConfigDict(env_prefix="AL_", extra="ignore", hide_input_in_errors=True)

    environment: Literal["development", "production"] = Field(
        "development", description="production refuses to start without API keys"
    )
    data_dir: Path = Field(Path("data"), description="uploads, model directories and the embedded broker/store")
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "AL_REDIS_URL"),
        description="Celery broker; unset = an embedded broker in files under data_dir",
    )
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("DATABASE_URL", "AL_DATABASE_URL"),
        description="SQLAlchemy URL of the job store; unset = SQLite at data_dir/al.db",
    )
    # Many hosts (docs/deploy.md): workers elsewhere reach the artifacts through the API, and each other's stages.
    artifacts_url: str | None = Field(
        None, pattern=r"^(https?://[^/\s]+/?)?$",
        description="where datasets, checkpoints and model versions live: unset = data_dir; "
        "http(s)://API-HOST:PORT = the API serves them to workers on other hosts (service/artifacts.py); empty = unset",
    )
    api_key: SecretStr | None = Field(None, description="the key a worker sends to the API (scope worker)")
    cache_bytes: int = Field(
        20 * 2**30, ge=0, description="a worker with AL_ARTIFACTS_URL: bytes of datasets and job folders it keeps "
        "copies of (service/cache.py); past it the least recently used datasets go",
    )
    stage_address: str | None = Field(
        None, description="the address other workers reach a pipeline job's stage 0 on, when this worker runs it; "
        "unset = this host's address on the route to the broker",
    )
    queue: str = Field("al.jobs", min_length=1, max_length=200, description="broker queue of training jobs")
    embedded_worker: bool = Field(True, description="`al serve` starts a worker next to the API")
    # `al serve`'s API processes (app/serve.py): one event loop each, with its own loaded models, batcher and
    # inference thread; the kernel spreads connections over them. One loop did about 1500 one-row predicts a second.
    web_workers: int = Field(
        default_factory=usable_cores, ge=1, le=256,
        description="API processes of `al serve`; unset = the cores it may run on (CPU affinity)",
    )
    access_log: bool = Field(True, description="a line per HTTP request on stdout (uvicorn's access log)")
    ui: bool = Field(True, description="serve the web dashboard at /ui")
    api_keys: str = Field(
        "", description="comma-separated TOKEN[:SCOPE[:TENANT]] bearer keys; empty = no authentication, "
        "everything belongs to the default tenant"
    )
    docs: bool | None = Field(None, description="serve /docs, /redoc and /openapi.json; unset = only in development")
    # Quotas per tenant: backpressure, so that one tenant cannot fill the queue or the disk for everyone.
    max_queued_jobs: int = Field(100, ge=1, description="queued jobs a tenant may have; past it, 429")
    max_active_studies: int = Field(10, ge=1, description="unfinished studies a tenant may have; past it, 429")
    disk_quota_bytes: int = Field(
        10 * 2**30, ge=1, description="bytes of uploaded datasets a tenant may keep; an upload past it, 507"
    )

    # Requests a tenant may have in flight at once, per kind (app/edge.py): past one, 429 with Retry-After.
    max_concurrent_predicts: int = Field(64, ge=1, description="predict and v2 infer requests per tenant")
    max_concurrent_uploads: int = Field(4, ge=1, description="dataset uploads per tenant")
    max_concurrent_streams: int = Field(16, ge=1, description="open event streams (jobs' and studies') per tenant")
    session_secret: SecretStr | None = Field(
        None, description="signs the dashboard's session cookie; unset = a new random one at each start (every "
        "dashboard session then ends with the process, and API processes behind one address need the same one)",
    )

    # Byte limits on what a client may send (the rest are in app/schemas.py, where OpenAPI shows them).
    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="JSON request bodies")
    max_upload_bytes: int = Field(256 * 2**20, ge=1024, description="dataset uploads")
    # What one accepted job may make a worker hold: about 4x the dataset's arrays as float32 (the samples and
    # their normalised splits) plus 16 bytes per parameter (weights, gradients, Adam's two moments).
    max_dataset_bytes: int = Field(
        2**30, ge=1024, description="an uploaded .npz array's size once decompressed (a zip bomb is refused unread)"
    )
    max_classes: int = Field(1000, ge=2, description="distinct labels of an uploaded dataset")
    max_parameters: int = Field(50_000_000, ge=1000, description="parameters of the network a job asks for")

    # Long jobs (docs/service.md, "What happens when a worker dies"): a lease per running job, renewed
    # by a heartbeat; a reconciler requeues jobs whose lease expired.
    lease_seconds: float = Field(30.0, gt=0, description="a running job is presumed dead this long after a heartbeat")
    reconcile_interval: float = Field(5.0, gt=0, description="seconds between reconciler passes in each worker")
    requeue_queued_after: float = Field(
        300.0, gt=0, description="resend the message of a job still queued after this many seconds (a lost message)"
    )
    max_attempts: int = Field(3, ge=1, description="a job whose worker died this many times fails")
    store_outage_seconds: float = Field(
        120.0, ge=0, description="how long a training job waits for a job store that does not answer (a database "
        "restart) before its attempt fails"
    )
    visibility_timeout: int = Field(3600, ge=1, description="Redis: seconds before an unacked message is redelivered")
    job_soft_time_limit: int = Field(7 * 86400, ge=1, description="seconds a job may train")
    progress_interval: float = Field(0.5, gt=0, description="least seconds between progress writes of a job")
    events_poll_interval: float = Field(0.5, gt=0, description="how often an SSE stream looks at its job")
    broker_poll_interval: float = Field(0.1, gt=0, description="embedded broker: seconds between queue polls")
    worker_concurrency: int = Field(1, ge=1, description="training processes per worker (one per GPU)")
    model_cache_size: int = Field(8, ge=1, description="models kept loaded for inference")
    inference_threads: int = Field(
        1, ge=1, description="torch CPU threads of `al serve`'s inference; more only pay on an idle machine"
    )
    # Dynamic batching: concurrent predict requests for the same model version, depth and exit_confidence
    # share one forward on the inference thread (app/batching.py).
    batch_max_size: int = Field(
        64, ge=1, description="rows per batched forward; 1 turns batching off (a larger request runs alone)"
    )
    batch_queue_rows: int = Field(
        16384, ge=1, description="rows waiting for the inference thread, all models together; a request that would "
        "take the queue past it gets 503 with Retry-After (a request finding the queue empty always joins)",
    )
    batch_wait_ms: float = Field(
        0.0, ge=0, le=1000,
        description="ms a request waits for others to join when the inference thread is idle (0: it runs at once); "
        "while the thread is busy, requests gather into the next batch anyway",
    )

    @model_validator(mode="after")
    def _safe_outside_development(self) -> Settings:
        self.keys  # noqa: B018 - a malformed AL_API_KEYS stops the start here, naming the entry
        if self.environment == "production" and not self.keys:
            raise ValueError("AL_ENVIRONMENT=production needs AL_API_KEYS")
        return self

    @cached_property
    def keys(self) -> list[ApiKey]:
        return parse_api_keys(self.api_keys)

    @property
    def docs_enabled(self) -> bool:
        return self.docs if self.docs is not None else self.environment == "development"

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'al.db').resolve()}"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        """Registered versions, models/<name>/<version>: copies that never change."""
        return self.data_dir / "models"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def worker_seen_within(self) -> float:
        """A worker whose reconciler has not reported for this long is presumed gone."""
        return 3 * self.reconcile_interval

    @property
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3


@lru_cache
def get_settings() -> Settings:
    return Settings()
