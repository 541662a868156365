"""`al bench serve`: latency and throughput of POST /v1/models/{name}/predict on loopback, with one and two
API processes (AL_WEB_WORKERS) and dynamic batching off and on, next to the bare in-process forward of the
same model, and the time from POST /v1/jobs to `running`.

It starts a real `al serve` (API + worker) on a free port with a throw-away data directory, trains
the model through the service itself, and starts three more (API only) on the same data directory,
one for each other setting. Each case is measured on every server back to back, so load from
elsewhere on the machine hits them alike, with keep-alive HTTP clients (coroutines). Every loop is
bounded by --requests / --jobs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter

from benchmarks.report import destination, publish

ROW_COUNTS = (1, 64)
CLIENT_COUNTS = (1, 8, 32)
WEB_WORKERS = (1, 2)  # API processes
BATCHING = {"off": {"AL_BATCH_MAX_SIZE": "1"}, "on": {}}  # on: the settings' defaults
MODEL = "bench"
# After each job the worker replaces its pool process (max_tasks_per_child=1): on a busy 2-core
# machine the new one took up to about 3 s to be ready. Waiting this long makes the next job meet
# an idle worker, which is what submit-to-running is about.
IDLE_WAIT = 5.0


class Server:
    """`al serve` in a session of its own on a free loopback port."""

    def __init__(self, data_dir: Path, redis_url: str | None, inference_threads: int, label: str, extra: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "AL_API_KEYS")
               and not k.startswith("AL_BATCH_") and k != "AL_WEB_WORKERS"}
        env["AL_DATA_DIR"] = str(data_dir)
        env["AL_INFERENCE_THREADS"] = str(inference_threads)
        env["AL_QUEUE"] = f"al.bench.{os.getpid()}"  # never a message of another service sharing the Redis
        env.update(extra)
        if redis_url:
            env["REDIS_URL"] = redis_url
        self.log = data_dir.parent / f"serve-{label}.log"
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
    """`requests` timed POSTs spread over `clients` keep-alive connections, each sending its next request
    when the last is answered. The clients are coroutines in one thread: Python threads would wait for
    each other's GIL, and that wait, not the server, made the tail at 32 of them."""
    return asyncio.run(_predict_latency(server.port, rows, clients, max(requests // clients, 10)))


async def _predict_latency(port: int, rows: list[list[float]], clients: int, per_client: int) -> dict:
    body = json.dumps({"inputs": rows}).encode()
    request = (f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, times: int) -> list[float]:
        seconds = []
        for _ in range(times):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.readexactly(int(re.search(rb"content-length: *(\d+)", head, re.I)[1]))
            seconds.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"predict failed: {head.splitlines()[0].decode()}: {answer.decode()}")
        return seconds

    connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(clients)))
    try:
        await asyncio.gather(*(post(*c, 5) for c in connections))  # warm-up: connections, model cache, allocator
        started = time.perf_counter()
        latencies = [s for mine in await asyncio.gather(*(post(*c, per_client) for c in connections)) for s in mine]
        wall = time.perf_counter() - started
    finally:
        for _, writer in connections:
            writer.close()
    p50, p99 = percentiles_ms(latencies)
    return {"p50_ms": p50, "p99_ms": p99, "requests_per_second": len(latencies) / wall, "requests": len(latencies)}


def bare_forward(model_dir: Path, rows: list[list[float]], iterations: int, threads: int) -> dict:
    import torch

    from al.checkpoint import load_model

    torch.set_num_threads(threads)  # as the server

    model, x = load_model(model_dir), np.asarray(rows, dtype=np.float32)
    for _ in range(20):
        model.predict(model.request(x))
    seconds = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        model.predict(model.request(x))
        seconds.append(time.perf_counter() - t0)
    p50, p99 = percentiles_ms(seconds)
    return {"p50_ms": p50, "p99_ms": p99}


def measure_cases(servers: dict[tuple[int, str], Server], model_dir: Path, args) -> list[dict]:
    """Each rows x clients case on every server, back to back, next to the bare forward of those rows."""
    from sklearn.datasets import load_digits

    samples, cases = load_digits().data.tolist(), []
    for n_rows in ROW_COUNTS:
        rows = samples[:n_rows]
        bare = bare_forward(model_dir, rows, args.requests, args.inference_threads)
        for clients in CLIENT_COUNTS:
            for (web_workers, batching), server in servers.items():
                served = predict_latency(server, rows, clients, args.requests)
                cases.append({"rows": n_rows, "clients": clients, "web_workers": web_workers, "batching": batching,
                              "bare": bare, **served})
                print(f"{n_rows} rows, {clients} clients, {web_workers} API process(es), batching {batching}: "
                      f"p50 {served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms, "
                      f"{served['requests_per_second']:.0f} req/s (bare p50 {bare['p50_ms']:.3f} ms)", file=sys.stderr)
    return cases


def bench_serve(args) -> None:
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure here
    submitted, cases = measure_servers(args)
    broker = "Redis" if args.redis_url else "embedded (filesystem)"
    observed, recorded = submitted["observed"], submitted["recorded"]
    publish(
        destination(args),
        name="serve-redis" if args.redis_url else "serve",
        title=f"Service ({broker} broker): predict latency and throughput over HTTP with 1 and 2 API processes and "
              "dynamic batching off and on, next to the bare forward, and submit-to-running",
        columns=["measure", "API processes", "batching", "clients", "p50 ms", "p99 ms", "requests/s", "x off",
                 "bare forward p50 / p99 ms", "p50 overhead ms"],
        rows=[*predict_rows(cases), submit_row(observed, recorded, broker)],
        notes=notes(args.inference_threads, load_at_start, access_log()),
        raw={"cases": cases, "submit_to_running_seconds": observed, "submit_to_running_recorded_seconds": recorded,
             "broker": broker, "requests_per_case": args.requests, "load_average_at_start": load_at_start,
             "inference_threads": args.inference_threads, "batching": BATCHING, "web_workers": WEB_WORKERS,
             "access_log": access_log()},
    )


def access_log() -> bool:
    """The servers' access log: AL_ACCESS_LOG as this process has it (they inherit it), read as the settings do."""
    return TypeAdapter(bool).validate_python(os.environ.get("AL_ACCESS_LOG", "1"))


def measure_servers(args) -> tuple[dict, list[dict]]:
    """A server per API processes x batching setting on a throw-away data directory: submit-to-running, then the
    cases."""
    servers: dict[tuple[int, str], Server] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        try:
            for web_workers in WEB_WORKERS:
                for batching, extra in BATCHING.items():  # the first one's worker trains the model; one is enough
                    worker = {"AL_EMBEDDED_WORKER": "0"} if servers else {}
                    servers[web_workers, batching] = Server(
                        data_dir, args.redis_url, args.inference_threads, f"{web_workers}-{batching}",
                        {**extra, **worker, "AL_WEB_WORKERS": str(web_workers)})
            submitted = submit_to_running(next(iter(servers.values())), args.jobs, args.epochs)
            cases = measure_cases(servers, data_dir / "jobs" / submitted["job"]["id"], args)
        finally:
            for server in servers.values():
                server.stop()
    return submitted, cases


def predict_rows(cases: list[dict]) -> list[dict]:
    unbatched = {(c["rows"], c["clients"], c["web_workers"]): c["requests_per_second"]
                 for c in cases if c["batching"] == "off"}
    return [{
        "measure": f"POST predict, {c['rows']} row{'s' if c['rows'] > 1 else ''}",
        "API processes": c["web_workers"],
        "batching": c["batching"],
        "clients": c["clients"],
        "p50 ms": f"{c['p50_ms']:.2f}",
        "p99 ms": f"{c['p99_ms']:.2f}",
        "requests/s": f"{c['requests_per_second']:.0f}",
        "x off": f"{c['requests_per_second'] / unbatched[c['rows'], c['clients'], c['web_workers']]:.2f}",
        "bare forward p50 / p99 ms": f"{c['bare']['p50_ms']:.3f} / {c['bare']['p99_ms']:.3f}",
        "p50 overhead ms": f"{c['p50_ms'] - c['bare']['p50_ms']:.2f}",
    } for c in cases]


def submit_row(observed: list[float], recorded: list[float], broker: str) -> dict:
    return {
        "measure": f"POST /v1/jobs to running ({broker} broker), idle worker",
        "clients": 1,
        "p50 ms": f"{statistics.median(observed) * 1000:.0f}",
        "p99 ms": f"{max(observed) * 1000:.0f} (max of {len(observed)})",
        "p50 overhead ms": f"server-recorded {statistics.median(recorded) * 1000:.0f}",
    }


def notes(inference_threads: int, load_at_start: float, access_log: bool) -> str:
    return (
        "Loopback, `al serve` and the clients (coroutines in one thread, keep-alive HTTP/1.1, each sending its next "
        "request when the last is answered) on the same machine, so at 8 and 32 clients they share its cores. "
        "API processes: AL_WEB_WORKERS, each with its own event loop, loaded model, batcher and inference thread "
        "(one thread: AL_INFERENCE_THREADS), the clients' connections spread over them by the kernel. Batching off: "
        "AL_BATCH_MAX_SIZE=1, every request its own forward; on: the defaults (docs/service.md), concurrent requests "
        "to one process share one forward. Four servers on one data directory, each case measured on all four back "
        "to back; x off: requests/s over the same case with the same API processes and batching off. Access log "
        f"{'on (the default)' if access_log else 'off (AL_ACCESS_LOG=0)'}. Model: the digits MLP of the default "
        "preset, trained by the service itself. Bare forward: `LoadedModel.request` and `predict` in-process on the "
        "same rows (check, normalise, forward, softmax, to lists), the work the server does per request, back "
        f"to back; both with {inference_threads} torch thread(s). Submit-to-running: "
        "client-observed time from POST /v1/jobs until GET shows `running` (10 ms polling), and the server's "
        "started_at - created_at, after one unmeasured job that waits out the worker's start-up, each "
        f"{IDLE_WAIT:.0f} s after the previous job ended. "
        "Targets: p50 overhead <= 2 ms for one row at 1 client, submit-to-running <= 1 s (issue 4); with "
        "batching, one-row requests at 32 clients >= 3x the unbatched throughput (issue 14); on 2 cores, 32 one-row "
        "clients at p99 <= 25 ms and >= 1.5x the 1479 requests/s of one process before issue 23, 1 client p50 "
        "overhead <= 1.5 ms, 64-row requests no slower (issue 23). "
        f"Load average (1 min) when the run started: {load_at_start:.1f} on {os.cpu_count()} cores."
    )
