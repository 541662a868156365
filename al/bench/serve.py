"""`al bench serve`: latency and throughput of POST /v1/models/{name}/predict on loopback next to the
bare in-process forward of the same model, and the time from POST /v1/jobs to `running`.

It starts a real `al serve` (API + worker) on a free port with a throw-away data directory, trains
the model through the service itself, measures with keep-alive HTTP clients in threads, and stops
the server. Every loop is bounded by --requests / --jobs.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from al.bench.report import destination, publish

ROW_COUNTS = (1, 64)
CLIENT_COUNTS = (1, 32)
MODEL = "bench"
# After each job the worker replaces its pool process (max_tasks_per_child=1): on a busy 2-core
# machine the new one took up to about 3 s to be ready. Waiting this long makes the next job meet
# an idle worker, which is what submit-to-running is about.
IDLE_WAIT = 5.0


class Server:
    """`al serve` in a session of its own on a free loopback port."""

    def __init__(self, data_dir: Path, redis_url: str | None, inference_threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "AL_API_KEYS")}
        env["AL_DATA_DIR"] = str(data_dir)
        env["AL_INFERENCE_THREADS"] = str(inference_threads)
        env["AL_QUEUE"] = f"al.bench.{os.getpid()}"  # never a message of another service sharing the Redis
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.log = data_dir.parent / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "al.cli", "serve", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"al serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if self.request("GET", "/v2/health/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("al serve did not become ready in 90 s")

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = self.connection()
        try:
            return call(conn, method, path, None if body is None else json.dumps(body).encode())
        finally:
            conn.close()

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def call(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def submit_to_running(server: Server, jobs: int, epochs: int) -> dict:
    """Jobs one at a time to an idle worker: client-observed and server-recorded time to `running`."""
    observed, recorded, job = [], [], None
    for seed in range(jobs + 1):  # the first one only waits out the worker's start-up
        spec = {"dataset": "digits", "name": MODEL, "training": {"epochs": epochs, "seed": seed}}
        started = time.perf_counter()
        status, job = server.request("POST", "/v1/jobs", spec)
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {job}")
        while job["status"] == "queued" and time.perf_counter() - started < 60:
            time.sleep(0.01)
            job = server.request("GET", f"/v1/jobs/{job['id']}")[1]
        observed.append(time.perf_counter() - started)
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
            job = server.request("GET", f"/v1/jobs/{job['id']}")[1]
        if job["status"] != "succeeded":
            raise RuntimeError(f"bench job ended {job['status']}: {job['error']}")
        if seed > 0:
            recorded.append(parse_time(job["started_at"]) - parse_time(job["created_at"]))
        else:
            observed.pop()
        time.sleep(IDLE_WAIT)
    return {"observed": observed, "recorded": recorded, "job": job}


def predict_latency(server: Server, rows: list[list[float]], clients: int, requests: int) -> dict:
    """`requests` timed POSTs spread over `clients` threads, each with its own keep-alive connection."""
    body = json.dumps({"inputs": rows}).encode()
    path = f"/v1/models/{MODEL}/predict"
    per_client = max(requests // clients, 10)
    latencies: list[float] = []
    lock, ready = threading.Lock(), threading.Barrier(clients + 1)
    failures: list[str] = []

    def client() -> None:
        conn, mine = server.connection(), []
        for _ in range(5):  # warm-up: connection, model cache, allocator
            call(conn, "POST", path, body)
        ready.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            status, answer = call(conn, "POST", path, body)
            mine.append(time.perf_counter() - t0)
            if status != 200:
                failures.append(f"{status}: {answer}")
                break
        conn.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"predict failed: {failures[0]}")
    p50, p99 = percentiles_ms(latencies)
    return {"p50_ms": p50, "p99_ms": p99, "requests_per_second": len(latencies) / wall, "requests": len(latencies)}


def bare_forward(model_dir: Path, rows: list[list[float]], iterations: int, threads: int) -> dict:
    import torch

    from al.checkpoint import load_model

    torch.set_num_threads(threads)  # as the server

    model, x = load_model(model_dir), np.asarray(rows, dtype=np.float32)
    for _ in range(20):
        model.predict(x)
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        model.predict(x)
        seconds.append(time.perf_counter() - t0)
    p50, p99 = percentiles_ms(seconds)
    return {"p50_ms": p50, "p99_ms": p99}


def bench_serve(args) -> None:
    from sklearn.datasets import load_digits

    samples = load_digits().data.tolist()
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure here
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        server = Server(data_dir, args.redis_url, args.inference_threads)
        try:
            submitted = submit_to_running(server, args.jobs, args.epochs)
            model_dir = data_dir / "jobs" / submitted["job"]["id"]
            cases = []
            for n_rows in ROW_COUNTS:
                rows = samples[:n_rows]
                bare = bare_forward(model_dir, rows, args.requests, args.inference_threads)
                for clients in CLIENT_COUNTS:
                    served = predict_latency(server, rows, clients, args.requests)
                    cases.append({"rows": n_rows, "clients": clients, "bare": bare, **served})
                    print(f"{n_rows} rows, {clients} clients: p50 {served['p50_ms']:.2f} ms, "
                          f"{served['requests_per_second']:.0f} req/s (bare p50 {bare['p50_ms']:.3f} ms)",
                          file=sys.stderr)
        finally:
            server.stop()
    broker = "Redis" if args.redis_url else "embedded (filesystem)"
    rows = [{
        "measure": f"POST predict, {c['rows']} row{'s' if c['rows'] > 1 else ''}",
        "clients": c["clients"],
        "p50 ms": f"{c['p50_ms']:.2f}",
        "p99 ms": f"{c['p99_ms']:.2f}",
        "requests/s": f"{c['requests_per_second']:.0f}",
        "bare forward p50 / p99 ms": f"{c['bare']['p50_ms']:.3f} / {c['bare']['p99_ms']:.3f}",
        "p50 overhead ms": f"{c['p50_ms'] - c['bare']['p50_ms']:.2f}",
    } for c in cases]
    observed, recorded = submitted["observed"], submitted["recorded"]
    rows.append({
        "measure": f"POST /v1/jobs to running ({broker} broker), idle worker",
        "clients": 1,
        "p50 ms": f"{statistics.median(observed) * 1000:.0f}",
        "p99 ms": f"{max(observed) * 1000:.0f} (max of {len(observed)})",
        "requests/s": "",
        "bare forward p50 / p99 ms": "",
        "p50 overhead ms": f"server-recorded {statistics.median(recorded) * 1000:.0f}",
    })
    publish(
        destination(args),
        name="serve-redis" if args.redis_url else "serve",
        title=f"Service ({broker} broker): predict latency over HTTP next to the bare forward, and submit-to-running",
        columns=["measure", "clients", "p50 ms", "p99 ms", "requests/s", "bare forward p50 / p99 ms",
                 "p50 overhead ms"],
        rows=rows,
        notes=(
            "Loopback, one `al serve` process (uvicorn, one event loop, inference on one thread of its own) and "
            "the clients (Python threads, keep-alive http.client) on the same machine, so at 32 clients they "
            "share its cores. Model: the digits MLP of the default preset, trained by the service itself. "
            "Bare forward: `LoadedModel.predict` in-process on the same rows (normalise, forward, softmax, "
            f"to lists), the work the server does per request, back to back; both with {args.inference_threads} "
            "torch thread(s) (AL_INFERENCE_THREADS). Submit-to-running: client-observed time from "
            "POST /v1/jobs until GET shows `running` (10 ms polling), and the server's started_at - created_at, "
            "after one unmeasured job that waits out the worker's start-up, each "
            f"{IDLE_WAIT:.0f} s after the previous job ended. "
            "Targets (issue 4): p50 overhead <= 2 ms for one row; submit-to-running <= 1 s. "
            f"Load average (1 min) when the run started: {load_at_start:.1f} on {os.cpu_count()} cores."
        ),
        raw={"cases": cases, "submit_to_running_seconds": observed, "submit_to_running_recorded_seconds": recorded,
             "broker": broker, "requests_per_case": args.requests, "load_average_at_start": load_at_start,
             "inference_threads": args.inference_threads},
    )


def add_parser(kinds, common) -> None:
    p = kinds.add_parser("serve", parents=[common],
                         help="HTTP predict latency next to the bare forward; submit-to-running time")
    p.add_argument("--requests", type=int, default=400, help="timed requests per case (default 400)")
    p.add_argument("--jobs", type=int, default=5, help="jobs submitted one at a time (default 5)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each bench job (default 1)")
    p.add_argument("--redis-url", default=None, help="use this Redis as the broker (default: the embedded one)")
    p.add_argument("--inference-threads", type=int, default=1, help="torch threads of the server and the bare forward")
    p.set_defaults(func=bench_serve)
