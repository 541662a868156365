"""The service's settings: one object, read from environment variables once per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AL_", extra="ignore")

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
    queue: str = Field("al.jobs", min_length=1, max_length=200, description="broker queue of training jobs")
    embedded_worker: bool = Field(True, description="`al serve` starts a worker next to the API")
    ui: bool = Field(True, description="serve the web dashboard at /ui")
    api_keys: str = Field("", description="comma-separated bearer tokens; empty = no authentication")

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

    # Long jobs (see ../shared/docs/service-notes.md): a lease per running job, renewed by a heartbeat;
    # a reconciler requeues jobs whose lease expired.
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
    batch_wait_ms: float = Field(
        0.0, ge=0, le=1000,
        description="ms a request waits for others to join when the inference thread is idle (0: it runs at once); "
        "while the thread is busy, requests gather into the next batch anyway",
    )

    @model_validator(mode="after")
    def _safe_outside_development(self) -> Settings:
        if self.environment == "production" and not self.keys:
            raise ValueError("AL_ENVIRONMENT=production needs AL_API_KEYS")
        return self

    @property
    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

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
    def heartbeat_interval(self) -> float:
        return self.lease_seconds / 3


@lru_cache
def get_settings() -> Settings:
    return Settings()
