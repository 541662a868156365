"""Jobs survive dead workers: a worker SIGKILLed mid-job (Redis broker), the whole embedded
`al serve` SIGKILLed and restarted, a worker stopped with SIGTERM; and a running job is cancelled
cooperatively."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from fastapi.testclient import TestClient
from service_support import (
    TINY_MODEL,
    drop_queue,
    free_port,
    fresh_redis,
    service_env,
    start_server,
    start_worker,
    use_env,
    wait_for,
)

from app.main import create_app

# Four epochs of about a second each: long enough to kill a worker between epoch 1 and the end.
RESUMABLE_JOB = {"dataset": "digits", "model": TINY_MODEL, "training": {"epochs": 4, "batch_size": 32}}


def checkpointed(client, job_id: str, data_dir) -> bool:
    """The first epoch is done and its checkpoint complete: checkpoint.pt, then config.json (the store
    hears of an epoch just before; al/run.py resumes only when both files are there)."""
    model_dir = data_dir / "jobs" / job_id
    return job_of(client, job_id)["progress"]["epoch"] >= 1 and all(
        (model_dir / name).is_file() for name in ("checkpoint.pt", "config.json")
    )


def job_of(client, job_id: str) -> dict:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def assert_resumed_once(client, job_id: str, epochs: int) -> dict:
    job = job_of(client, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2, job
    assert job["resumed_from_epoch"] is not None and job["resumed_from_epoch"] >= 1, job
    recorded = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]]
    assert recorded == list(range(1, epochs + 1))  # no epoch lost, none recorded twice
    versions = client.get(f"/v1/models/{job['name']}").json()["versions"]
    assert [v["job_id"] for v in versions] == [job_id]  # registered exactly once
    return job


@pytest.fixture
def redis_service(tmp_path, monkeypatch):
    env = service_env(tmp_path / "data", fresh_redis())
    with TestClient(create_app(use_env(monkeypatch, env))) as client:
        yield env, client
    drop_queue(env)


def test_killed_worker_job_resumes_from_checkpoint_exactly_once(redis_service, tmp_path):
    env, client = redis_service
    first = start_worker(env, tmp_path / "worker-1.log")
    job_id = client.post("/v1/jobs", json={**RESUMABLE_JOB, "name": "survivor"}).json()["id"]
    wait_for(lambda: checkpointed(client, job_id, tmp_path / "data"), 90, "the first checkpoint")
    first.kill_group()
    assert job_of(client, job_id)["status"] == "running"  # nobody has noticed yet: the lease is still live

    second = start_worker(env, tmp_path / "worker-2.log")
    try:
        wait_for(lambda: job_of(client, job_id)["status"] in ("succeeded", "failed"), 120, "the resumed job")
        job = assert_resumed_once(client, job_id, epochs=4)
        assert f"job {job_id} resumes at epoch {job['resumed_from_epoch']}" in second.output()

        # Cancelling a running job: it stops after a step, keeps its checkpoint, registers no model.
        long_job = client.post("/v1/jobs", json={**RESUMABLE_JOB, "training": {"epochs": 200}}).json()["id"]
        wait_for(lambda: job_of(client, long_job)["progress"]["step"] > 0, 60, "the long job to train")
        cancelled = client.post(f"/v1/jobs/{long_job}/cancel")
        assert cancelled.status_code == 202 and cancelled.json()["status"] in ("cancelling", "cancelled")
        wait_for(lambda: job_of(client, long_job)["status"] == "cancelled", 30, "the cancellation")
        job = job_of(client, long_job)
        assert job["model"] is None and job["progress"]["epoch"] < 200
        assert (tmp_path / "data" / "jobs" / long_job / "checkpoint.pt").is_file()
        assert client.post(f"/v1/jobs/{long_job}/cancel").status_code == 409

        # A warm shutdown (SIGTERM) checkpoints the running job at its current step and requeues it at once,
        # without waiting for the lease to expire.
        preempted = client.post("/v1/jobs", json={**RESUMABLE_JOB, "name": "preempted"}).json()["id"]
        wait_for(lambda: job_of(client, preempted)["progress"]["step"] > 0, 60, "the job to train")
        second.popen.terminate()
        second.popen.wait(30)
        assert job_of(client, preempted)["status"] == "queued"
    finally:
        second.stop()
    third = start_worker(env, tmp_path / "worker-3.log")
    try:
        wait_for(lambda: job_of(client, preempted)["status"] in ("succeeded", "failed"), 120, "the requeued job")
        job = job_of(client, preempted)
        assert job["status"] == "succeeded" and job["attempts"] == 2 and job["resumed_from_epoch"] is not None, job
        assert [m["epoch"] for m in client.get(f"/v1/jobs/{preempted}/metrics").json()["epochs"]] == [1, 2, 3, 4]
    finally:
        third.stop()


def test_embedded_serve_killed_with_sigkill_finishes_the_job_after_restart(tmp_path):
    env = service_env(tmp_path / "data", redis_url=None)  # no Redis: the embedded broker
    port = free_port()
    serve = start_server(env, tmp_path / "serve-1.log", port)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        job_id = client.post("/v1/jobs", json={**RESUMABLE_JOB, "name": "embedded"}).json()["id"]
        wait_for(lambda: checkpointed(client, job_id, tmp_path / "data"), 90, "the first checkpoint")
    # SIGKILL to `al serve` alone: its worker and the worker's pool child must die with it.
    os.kill(serve.popen.pid, signal.SIGKILL)
    serve.popen.wait()
    wait_for(lambda: not serve.alive(), 10, "the worker processes to die with al serve")
    serve.stop()

    restarted = start_server(env, tmp_path / "serve-2.log", port)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_for(lambda: job_of(client, job_id)["status"] in ("succeeded", "failed"), 120, "the resumed job")
            assert_resumed_once(client, job_id, epochs=4)
    finally:
        restarted.stop()
