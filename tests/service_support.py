"""Helpers for the service tests: real Redis, real worker and server processes, short leases."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own: the tests flush only this one
TINY_MODEL = {"arch": "mlp", "widths": [32], "target_width": 16}

# Short leases and fast polling so a dead worker's job is picked up within seconds.
FAST = {
    "AL_LEASE_SECONDS": "4",  # heartbeats every 4/3 s: room for a loaded machine
    "AL_RECONCILE_INTERVAL": "0.5",
    "AL_PROGRESS_INTERVAL": "0.1",
    "AL_EVENTS_POLL_INTERVAL": "0.1",
    "AL_BROKER_POLL_INTERVAL": "0.05",
    # One API process unless a test asks for more (tests/test_serving.py): what a test counts against a process
    # (a tenant's requests in flight, the server's memory) is then the whole server's.
    "AL_WEB_WORKERS": "1",
}
SERVICE_VARIABLES = ("REDIS_URL", "DATABASE_URL", "AL_API_KEYS", "AL_ENVIRONMENT", "AL_EMBEDDED_WORKER")


def fresh_redis() -> str:
    """REDIS_URL of the test database; fails (never skips) when Redis does not answer.

    Nothing is flushed: each test gets a queue of its own (service_env), so test runs that share
    this Redis at the same time never take each other's messages.
    """
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        pytest.fail("no Redis on 127.0.0.1:6379: run scripts/ensure-services (make test does)")
    return REDIS_URL


def drop_queue(env: dict[str, str]) -> None:
    """Remove a test's queue and kombu's bindings for it from the test database."""
    import redis

    client, queue = redis.Redis.from_url(REDIS_URL), env["AL_QUEUE"]
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")


def service_env(data_dir: Path, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES and not k.startswith("AL_")}
    env.update(FAST, AL_DATA_DIR=str(data_dir), AL_QUEUE=f"al.test.{uuid.uuid4().hex}", PYTHONUNBUFFERED="1",
               **extra)
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def use_env(monkeypatch, env: dict[str, str]):
    """Settings of this process from `env`, as a subprocess would read them."""
    from service.settings import Settings

    for key in [*SERVICE_VARIABLES, *(k for k in os.environ if k.startswith("AL_") and k not in env)]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith("AL_") or key in SERVICE_VARIABLES:
            monkeypatch.setenv(key, value)
    return Settings()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Process:
    """A service process in a session of its own, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._log_file = open(log, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "al.cli", *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()
        self._log_file.close()


def start_worker(env: dict[str, str], log: Path) -> Process:
    worker = Process(["worker"], env, log)
    wait_for(lambda: " ready." in worker.output() or worker.popen.poll() is not None, 60, "the worker to start")
    assert worker.popen.poll() is None, worker.output()
    return worker


def start_server(env: dict[str, str], log: Path, port: int) -> Process:
    import httpx

    server = Process(["serve", "--port", str(port)], env, log)

    def ready():
        if server.popen.poll() is not None:
            return True
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 60, "the server to answer", interval=0.2)
    assert server.popen.poll() is None, server.output()
    return server


def sse_events(response) -> list[tuple[str, dict]]:
    """(event, data) of a Server-Sent Events response (an httpx or TestClient stream), read to its end."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line.split(":", 1)[1])))
    return events


def digits_npz() -> bytes:
    """sklearn's digits as an upload: x (1797, 64), y."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    buffer = io.BytesIO()
    np.savez(buffer, x=digits.data.astype(np.float32), y=digits.target)
    return buffer.getvalue()


def digits_rows(n: int) -> list[list[float]]:
    from sklearn.datasets import load_digits

    return load_digits().data[:n].tolist()


def registered_model_client(tmp_path, monkeypatch, model_dir: Path, **extra: str):
    """A TestClient of the app (settings from service_env + `extra`) whose registry holds the model in
    `model_dir` as "digits" version 1."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = use_env(monkeypatch, service_env(tmp_path / "data", fresh_redis(), **extra))
    client = TestClient(create_app(settings))
    register_model(settings, model_dir)
    return client


def register_model(settings, model_dir: Path, tenant: str = "default", name: str = "digits") -> str:
    """The model in `model_dir` as the next version of the tenant's `name`, registered as a finished job
    would: through the store's lease and finish. Its job's id."""
    from al.config import make_config
    from service.store import get_store

    store = get_store(settings.store_url)
    config = make_config(training={"epochs": 1}).to_dict()
    job, _ = store.create_job(tenant, name, {"dataset": "digits"}, config, None, None)
    claim = store.take_lease(job.id, "test", 60)
    target = settings.jobs_dir / job.id
    target.mkdir(parents=True)
    for f in model_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    assert store.finish(job.id, claim.owner, "succeeded", result={"status": "completed"},
                        publish=lambda name, version: f"jobs/{job.id}")
    return job.id


def form_token(page_html: str) -> str:
    """The CSRF token a dashboard page carries (the key form's hidden field, or the page's meta tag)."""
    import re

    return re.search(r'(?:name="csrf" value|name="csrf-token" content)="([^"]+)"', page_html).group(1)


def dashboard_login(client, key: str, target: str = "/ui/jobs"):
    """Log `client` (httpx or TestClient) in as a browser does: a page (the key form, whose CSRF token the
    session holds), then the form's POST; the answer, redirects not followed."""
    form = client.get("/ui/jobs")
    return client.post("/ui/key", data={"key": key, "target": target, "csrf": form_token(form.text)},
                       follow_redirects=False)

