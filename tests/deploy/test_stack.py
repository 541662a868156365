"""The compose stack on a real Docker engine, driven by an outside client through its published
port, under the faults a deployment meets. Opt-in: `make test-deploy` (marker `deploy`).

The engine is installed and started where missing (scripts/ensure-docker, as root); the images
are built as `make deploy-up` builds them (scripts/deploy). The tests run in file order, each one
step on the same stack, and print their time; the stack and its volumes are removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service_support import digits_npz, digits_rows, free_port, wait_for  # noqa: E402

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PORT = free_port()
ENV = {
    **os.environ,
    "COMPOSE_PROJECT_NAME": "al-deploy-test",
    "COMPOSE_FILE": os.pathsep.join(["docker-compose.yml", "tests/deploy/compose.test.yml"]),
    "AL_PUBLISH": f"127.0.0.1:{PORT}",
}
URL = f"http://127.0.0.1:{PORT}"
MODEL = {"arch": "mlp", "widths": [32], "target_width": 16}
# A job that runs long enough to act on it mid-way: its epochs are sized from the first job's
# epoch time (the machine may be shared), between these bounds.
JOB_SECONDS, MIN_EPOCHS, MAX_EPOCHS = 20, 6, 60
STARTED = time.monotonic()


@contextmanager
def step(name: str):
    start = time.monotonic()
    yield
    print(f"\n[deploy] {name}: {time.monotonic() - start:.1f} s (total {time.monotonic() - STARTED:.0f} s)",
          flush=True)


def sh(*args: str, timeout: float = 900) -> str:
    done = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return done.stdout


def compose(*args: str) -> str:
    return sh("scripts/deploy", "compose", *args)


def containers(service: str) -> list[str]:
    return compose("ps", "-q", service).split()


def logs(container: str) -> str:
    return subprocess.run(["docker", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60).stdout


def health(container: str) -> str:
    return sh("docker", "inspect", "-f", "{{.State.Health.Status}}", container).strip()


@pytest.fixture(scope="module")
def stack():
    with step("docker engine (install and start where missing)"):
        engine = subprocess.run(["scripts/ensure-docker"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if engine.returncode != 0:
        pytest.skip(f"no Docker engine: {engine.stderr.strip()}")
    with step("base images, project image, up -d, healthy"):
        sh("scripts/deploy", "up")
    try:
        yield
    finally:
        with step("down -v"):
            sh("scripts/deploy", "down")


@pytest.fixture(scope="module")
def client(stack):
    with httpx.Client(base_url=URL, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client) -> str:
    uploaded = client.post("/v1/datasets", files={"file": ("digits.npz", digits_npz())})
    assert uploaded.status_code == 201, uploaded.text
    return uploaded.json()["id"]


def submit(client, dataset: str, name: str, epochs: int) -> str:
    spec = {"dataset": dataset, "name": name, "model": MODEL,
            "training": {"epochs": epochs, "batch_size": 32, "lr": 0.01}}
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def job_ids(client) -> set[str]:
    return {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]}


def running_at_epoch(client, job_id: str, epoch: int) -> dict:
    return wait_for(lambda: (j := job(client, job_id))["status"] == "running" and j["progress"]["epoch"] >= epoch
                    and j, 300, f"job {job_id} to run epoch {epoch}", interval=0.2)


def finished(client, job_id: str, timeout: float = 400) -> dict:
    done = wait_for(lambda: (j := job(client, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout, f"job {job_id} to finish", interval=0.5)
    assert done["status"] == "succeeded", done
    return done


def trained_once(client, job_id: str, epochs: int) -> None:
    """Every epoch's metrics once, in order: no epoch lost and none trained twice."""
    recorded = [m["epoch"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]]
    assert recorded == list(range(1, epochs + 1)), recorded


def predicts(client, name: str, version: int) -> None:
    rows = digits_rows(3)
    native = client.post(f"/v1/models/{name}/versions/{version}/predict", json={"inputs": rows})
    assert native.status_code == 200, native.text
    assert len(native.json()["predictions"]) == 3
    infer = client.post(f"/v2/models/{name}/versions/{version}/infer", json={
        "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32", "data": [v for r in rows for v in r]}]})
    assert infer.status_code == 200, infer.text
    outputs = {o["name"]: o["data"] for o in infer.json()["outputs"]}
    assert outputs["predictions"] == native.json()["predictions"]


def test_healthchecks_report_healthy(stack):
    with step("healthchecks"):
        for service in ("redis", "api", "worker"):
            (container,) = containers(service)
            assert health(container) == "healthy", service
        # published on loopback only, at the port asked for
        ports = sh("docker", "port", containers("api")[0], "8000").split()
        assert ports == [f"127.0.0.1:{PORT}"], ports


@pytest.fixture(scope="module")
def epochs(client) -> dict:
    """Epochs of a job that runs about JOB_SECONDS here; set by the first test."""
    return {}


def test_upload_train_follow_predict(client, dataset, epochs):
    with step("upload, train, follow events, predict natively and over v2"):
        job_id = submit(client, dataset, "flow", epochs=2)
        names = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=300) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            names = [line.split(":", 1)[1].strip() for line in response.iter_lines() if line.startswith("event:")]
        assert names[-1] == "end" and names.count("epoch") == 2, names
        assert finished(client, job_id)["model"] == {"name": "flow", "version": 1}
        predicts(client, "flow", 1)
        seconds = max(m["seconds"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"])
        epochs["job"] = min(MAX_EPOCHS, max(MIN_EPOCHS, round(JOB_SECONDS / seconds)))
        print(f"\n[deploy] {seconds:.1f} s an epoch: jobs of {epochs['job']} epochs")


def test_worker_restart_requeues_at_its_step(client, dataset, epochs):
    with step("restart the worker mid-job (SIGTERM, stop grace)"):
        job_id = submit(client, dataset, "restarted", epochs["job"])
        at = running_at_epoch(client, job_id, 2)["progress"]["epoch"]
        compose("restart", "worker")
        done = finished(client, job_id)
        assert done["attempts"] == 2 and done["resumed_from_epoch"] >= at, done
        trained_once(client, job_id, epochs["job"])


def test_worker_sigkill_resumes_from_checkpoint_after_the_lease(client, dataset, epochs):
    with step("kill -s KILL the worker mid-job, resume after the lease"):
        job_id = submit(client, dataset, "killed", epochs["job"])
        at = running_at_epoch(client, job_id, 2)["progress"]["epoch"]
        (worker,) = containers("worker")
        sh("docker", "kill", "-s", "KILL", worker)
        compose("start", "worker")  # the restart policy may already have
        done = finished(client, job_id)
        assert done["attempts"] == 2 and done["resumed_from_epoch"] >= at, done
        trained_once(client, job_id, epochs["job"])


def test_redis_restart_loses_nothing(client, dataset, epochs):
    with step("restart Redis mid-job (AOF)"):
        running = submit(client, dataset, "redis-running", epochs["job"])
        running_at_epoch(client, running, 1)
        # waits in Redis behind the running one; flow's version 2
        queued = submit(client, dataset, "flow", epochs=2)
        before = job_ids(client)
        time.sleep(1.5)  # appendfsync everysec
        (redis,) = containers("redis")
        sh("docker", "kill", "-s", "KILL", redis)
        compose("start", "redis")
        # the queued job's message came back from the append-only file: the reconciler would only
        # resend it after AL_REQUEUE_QUEUED_AFTER (300 s), far beyond these waits
        assert finished(client, running)["model"] == {"name": "redis-running", "version": 1}
        trained_once(client, running, epochs["job"])
        done = finished(client, queued, timeout=200)
        assert done["model"] == {"name": "flow", "version": 2} and done["attempts"] == 1, done  # its message, once
        trained_once(client, queued, 2)
        assert job_ids(client) == before  # the store lost no job and gained none
        predicts(client, "redis-running", 1)
        predicts(client, "flow", 2)


def test_two_workers_run_two_jobs_at_once(client, dataset, epochs):
    with step("--scale worker=2, two jobs at the same time"):
        compose("up", "-d", "--no-recreate", "--scale", "worker=2")
        workers = containers("worker")
        assert len(workers) == 2
        wait_for(lambda: all(health(w) == "healthy" for w in workers), 180, "both workers healthy", interval=1)
        jobs = [submit(client, dataset, f"scaled-{i}", epochs["job"]) for i in range(2)]
        wait_for(lambda: all(job(client, j)["status"] == "running" for j in jobs), 120, "both jobs running")
        for j in jobs:
            finished(client, j)
        ran = [{j for j in jobs if f"job {j}: attempt 1" in logs(w)} for w in workers]
        assert sorted(map(len, ran)) == [1, 1] and ran[0] != ran[1], ran


def test_down_and_up_keeps_jobs_datasets_and_models(client, dataset):
    with step("down, up (volumes kept): everything still there and predicts"):
        before_jobs = {j["id"]: j["status"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]}
        before_models = {m["name"]: [v["version"] for v in m["versions"]] for m in client.get("/v1/models").json()}
        compose("down")
        compose("up", "-d")
        sh("scripts/deploy", "wait")
        after_jobs = {j["id"]: j["status"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["items"]}
        assert after_jobs == before_jobs
        assert client.get(f"/v1/datasets/{dataset}").status_code == 200
        after_models = {m["name"]: [v["version"] for v in m["versions"]] for m in client.get("/v1/models").json()}
        assert after_models == before_models and after_models["flow"] == [1, 2], after_models
        for name, versions in after_models.items():
            for version in versions:
                predicts(client, name, version)
        print(json.dumps({"jobs": len(after_jobs), "models": after_models}))
