"""Faults under a real `al serve` and its worker: Redis (append-only) restarted mid-job, PostgreSQL restarted
mid-job, and a full disk while a checkpoint is written. Each job finishes or fails with a clear error; none is
lost, none trains twice, and no registered model is damaged."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest
from service_support import (
    TINY_MODEL,
    digits_rows,
    drop_queue,
    free_port,
    fresh_redis,
    service_env,
    start_server,
    wait_for,
)

# Leases far longer than any restart here: an attempt that lives through the fault keeps its job.
LONG_LEASE = {"AL_LEASE_SECONDS": "30", "AL_REQUEUE_QUEUED_AFTER": "3"}
JOB = {"dataset": "digits", "preset": "lean", "model": TINY_MODEL, "training": {"epochs": 12}}


def submit(client: httpx.Client, name: str, epochs: int = 12) -> str:
    answer = client.post("/v1/jobs", json={**JOB, "name": name, "training": {"epochs": epochs}})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    """The job, reading through a store that may be restarting (a 503 then)."""
    answer = client.get(f"/v1/jobs/{job_id}")
    return answer.json() if answer.status_code == 200 else {"status": f"HTTP {answer.status_code}", "progress": {}}


def wait_status(client: httpx.Client, job_id: str, wanted: tuple[str, ...], timeout: float = 240) -> dict:
    return wait_for(lambda: (j := job(client, job_id))["status"] in wanted and j, timeout,
                    f"job {job_id} to be {' or '.join(wanted)}", interval=0.2)


def wait_epoch(client: httpx.Client, job_id: str, epoch: int) -> None:
    wait_for(lambda: (job(client, job_id).get("progress") or {}).get("epoch", 0) >= epoch, 120,
             f"job {job_id} to reach epoch {epoch}", interval=0.1)


def assert_trained_once(client: httpx.Client, job_id: str, name: str) -> None:
    done = wait_status(client, job_id, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    versions = client.get(f"/v1/models/{name}").json()["versions"]
    assert [(v["version"], v["job_id"]) for v in versions] == [(1, job_id)]
    predicted = client.post(f"/v1/models/{name}/predict", json={"inputs": digits_rows(2)})
    assert predicted.status_code == 200, predicted.text


def test_redis_restarted_mid_job_loses_nothing(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
               "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    env = service_env(tmp_path / "data", f"redis://127.0.0.1:{port}/0", **LONG_LEASE)
    server = None
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0,
                 20, "redis to start")
        api_port = free_port()
        server = start_server(env, tmp_path / "serve.log", api_port)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            first = submit(client, "before")
            wait_epoch(client, first, 1)
            redis.terminate()  # SIGTERM: Redis writes its append-only file and exits
            redis.wait(20)
            redis = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            second = submit(client, "after")  # queued even if the broker is still coming back
            assert_trained_once(client, first, "before")
            assert_trained_once(client, second, "after")
    finally:
        if server:
            server.stop()
        redis.kill()
        redis.wait()


POSTGRES_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None) if Path(
    "/usr/lib/postgresql").is_dir() else None


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test's own (initdb as the postgres user), so restarting it touches nothing
    else; `restart()` stops and starts it."""
    if os.geteuid() != 0 or POSTGRES_BIN is None or not shutil.which("runuser"):
        pytest.skip("needs root and Debian's PostgreSQL server binaries to run a server of its own")
    directory = Path(tempfile.mkdtemp(prefix="al-pg-"))  # outside pytest's root-only tmp: postgres must reach it
    shutil.chown(directory, "postgres", "postgres")
    data, port = directory / "data", free_port()

    def pg(*args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / args[0]), *args[1:]], check=True,
                       capture_output=True, cwd=directory)

    pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    options = f"-p {port} -k {directory} -c listen_addresses=127.0.0.1"
    pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start")

    class Server:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

        @staticmethod
        def restart() -> None:
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
            pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(directory / "log"), "-w", "start")

    yield Server
    subprocess.run(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m",
                    "immediate", "stop"], capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)


def test_postgresql_restarted_mid_job_loses_nothing(tmp_path, own_postgres):
    env = service_env(tmp_path / "data", fresh_redis(), DATABASE_URL=own_postgres.url, **LONG_LEASE)
    port = free_port()
    server = start_server(env, tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            job_id = submit(client, "through-restart", epochs=20)
            wait_epoch(client, job_id, 1)
            own_postgres.restart()
            assert_trained_once(client, job_id, "through-restart")
    finally:
        server.stop()
        drop_queue(env)


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs: a disk that fills."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> None:
    """Writes until the disk is full."""
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_fails_the_job_clearly_and_damages_no_registered_model(tmp_path, small_disk):
    # The store on another disk, as a PostgreSQL would be: the job's failure must be recordable.
    env = service_env(small_disk / "data", fresh_redis(), DATABASE_URL=f"sqlite:///{tmp_path / 'al.db'}",
                      **LONG_LEASE)
    port = free_port()
    server = start_server(env, tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            registered = submit(client, "kept", epochs=2)
            assert wait_status(client, registered, ("succeeded", "failed"))["status"] == "succeeded"
            before = client.post("/v1/models/kept/predict", json={"inputs": digits_rows(3)}).json()
            fill(small_disk / "data")
            doomed = submit(client, "doomed", epochs=2)
            failed = wait_status(client, doomed, ("succeeded", "failed"))
            assert failed["status"] == "failed" and "No space left on device" in failed["error"], failed
            assert client.get("/v1/models/doomed").status_code == 404
            leftovers = [p.name for p in (small_disk / "data").rglob("*.tmp")]
            assert leftovers == [], f"half-written files left behind: {leftovers}"
            (small_disk / "data" / "filler").unlink()
            assert client.post("/v1/models/kept/predict", json={"inputs": digits_rows(3)}).json() == before
    finally:
        server.stop()
        drop_queue(env)
