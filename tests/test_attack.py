"""Issue 20, the HTTP edge, tried as an attacker and as a careless client would: a real `al serve` with keys
over two tenants, met through raw sockets where a client would use them. Without a key a request is refused
from its headers (its body unread); binary v2 bodies are measured as received; v2 obeys the row limit; the
batching queue, predicts, uploads and event streams have bounds per tenant; the dashboard's session is no key
and writes with it need its CSRF token; 64 anonymous clients sending 16 MiB each leave keyed predicts
unharmed; schemathesis's stateful run finds no server error."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from service_support import (
    Process,
    dashboard_login,
    drop_queue,
    form_token,
    free_port,
    fresh_redis,
    register_model,
    service_env,
    start_server,
    use_env,
    wait_for,
)

from al.config import make_config
from al.run import train

# Its bounds on how quickly the server answers under attack hold on a machine that runs nothing else.
pytestmark = pytest.mark.serial

KEYS = "adm1:admin:t1,trn1:train:t1,prd1:predict:t1,trn2:train:t2,wrk:worker"
FEATURES = 256  # 4096 rows of FP32 are then 4 MiB: the body the issue saw refused
MAX_PREDICTS, MAX_STREAMS = 16, 2
INFER = "/v2/models/digits/infer"


@dataclass
class Served:
    url: str
    port: int
    process: Process
    env: dict[str, str]

    def client(self, key: str | None, headers: dict[str, str] | None = None) -> httpx.Client:
        headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The API alone (nothing trains: a job or a study stays queued), tenant t1's "digits" (256 features) v1."""
    root = tmp_path_factory.mktemp("attack")
    rng = np.random.default_rng(0)
    np.savez(root / "wide.npz", x=rng.normal(size=(400, FEATURES)).astype(np.float32), y=np.arange(400) % 4)
    train(str(root / "wide.npz"), root / "model", make_config(
        model={"arch": "mlp", "widths": [32], "target_width": 16}, training={"epochs": 1, "device": "cpu"}))
    env = service_env(root / "data", fresh_redis(), AL_API_KEYS=KEYS, AL_EMBEDDED_WORKER="0",
                      AL_MAX_CONCURRENT_PREDICTS=str(MAX_PREDICTS), AL_MAX_CONCURRENT_UPLOADS="1",
                      AL_MAX_CONCURRENT_STREAMS=str(MAX_STREAMS), AL_BATCH_QUEUE_ROWS="4096")
    (root / "data").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        register_model(use_env(patch, env), root / "model", tenant="t1")
    port = free_port()
    process = start_server(env, root / "serve.log", port)
    yield Served(f"http://127.0.0.1:{port}", port, process, env)
    process.stop()
    assert "Traceback" not in process.output(), process.output()[-3000:]
    drop_queue(env)


def raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes | memoryview = b"",
                declared: int | None = None) -> socket.socket:
    """A connection that sent the request line, the headers (Content-Length `declared`, else the body's) and
    `body`, which may be only the start of the declared one."""
    connection = socket.create_connection(("127.0.0.1", port))
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             f"Content-Length: {len(body) if declared is None else declared}",
             *(f"{name}: {value}" for name, value in headers.items())]
    connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        connection.sendall(body)
    except OSError:  # the server answered and closed before the body was all sent: its answer is readable
        pass
    return connection


def status_within(connection: socket.socket, seconds: float) -> tuple[int, str]:
    """The status and head of the answer that arrives within `seconds`; fails if none does."""
    connection.settimeout(seconds)
    head = b""
    try:
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(65536)
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        pytest.fail(f"no answer within {seconds} s")
    except ConnectionResetError:
        pass
    finally:
        connection.close()
    text = head.decode("latin-1")
    return (int(text.split(" ", 2)[1]) if text else 0), text


def binary_infer(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A v2 infer body in Triton's binary tensor data extension, and its header."""
    values = np.ascontiguousarray(rows, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(values)}}]}).encode()
    return header + values, {"Inference-Header-Content-Length": str(len(header))}


def anonymous_16mib() -> tuple[bytes, dict[str, str]]:
    """A 16 MiB binary v2 body (UINT8, within AL_MAX_REQUEST_BYTES) sent without a key."""
    size = 16 * 2**20 - 200
    header = json.dumps({"inputs": [{"name": "input", "shape": [size // FEATURES, FEATURES], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    body = header + b"\1" * (16 * 2**20 - len(header))
    return body, {"Inference-Header-Content-Length": str(len(header))}


# --- finding 1: no key, no body read, no stall ------------------------------------------------------


def test_without_a_key_the_answer_comes_from_the_headers_before_the_body(server):
    """10 MB declared on POST /v1/jobs, 200 MB of multipart on /v1/datasets, 1 MB of each sent: 401 within a
    second, while the rest of the body is still to come. (main waited for the whole body.)"""
    megabyte = b"x" * 2**20
    jobs = raw_request(server.port, "POST", "/v1/jobs", {"Content-Type": "application/json"}, megabyte,
                       declared=10_000_000)
    assert status_within(jobs, 1.0)[0] == 401
    upload = raw_request(server.port, "POST", "/v1/datasets",
                         {"Content-Type": "multipart/form-data; boundary=b0undary"},
                         b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n\r\n'
                         + megabyte, declared=200_000_000)
    assert status_within(upload, 1.0)[0] == 401
    for key in ("not-a-key", "prd1 "):  # an unknown key; a known one with what follows it is not the key
        refused = raw_request(server.port, "POST", "/v1/jobs", {"Authorization": f"Bearer {key}x"}, megabyte,
                              declared=10_000_000)
        assert status_within(refused, 1.0)[0] == 401


def test_an_anonymous_16_mib_binary_body_is_refused_at_once_and_health_stays_quick(server):
    """The issue's 16 MiB UINT8 body without a key: 401 (main: 413 after 8 s, health up to 7.8 s meanwhile)."""
    body, headers = anonymous_16mib()
    with ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(lambda: status_within(raw_request(server.port, "POST", INFER, headers, body), 5.0))
                for _ in range(4)]
        with server.client(None) as client:
            slowest = 0.0
            while not all(s.done() for s in sent):
                started = time.perf_counter()
                assert client.get("/v2/health/live").status_code == 200
                slowest = max(slowest, time.perf_counter() - started)
        assert [s.result()[0] for s in sent] == [401] * 4
    assert slowest < 0.5, f"/v2/health/live took {slowest:.2f} s while anonymous bodies arrived"


# --- finding 2: the body limit is on the bytes received ------------------------------------------


def test_a_4_mib_binary_fp32_body_under_the_16_mib_limit_is_answered(server):
    rows = np.random.default_rng(1).normal(size=(4096, FEATURES))
    body, headers = binary_infer(rows)
    assert len(body) > 4 * 2**20
    with server.client("prd1") as client:
        answer = client.post(INFER, content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        native = client.post("/v1/models/digits/predict", json={"inputs": rows[:8].tolist()}).json()
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["predictions"]["shape"] == [4096]
    assert outputs["predictions"]["data"][:8] == native["predictions"]


# --- finding 3: v2's row limit, the batching queue's bound ---------------------------------------------


def test_v2_infer_obeys_the_native_row_limit(server):
    with server.client("prd1") as client:
        native = client.post("/v1/models/digits/predict", json={"inputs": [[0] * FEATURES] * 5000})
        assert native.status_code == 422 and "4096" in native.json()["detail"]
        tensor = {"name": "input", "shape": [5000, FEATURES], "datatype": "FP32", "data": [0] * (5000 * FEATURES)}
        v2 = client.post(INFER, json={"inputs": [tensor]})
    assert v2.status_code == 400 and "4096" in v2.json()["error"], v2.text[:300]  # v2's errors are 400 {"error"}


def test_a_full_batching_queue_answers_503_with_retry_after(server):
    """AL_BATCH_QUEUE_ROWS=4096 here: 12 requests of 4096 rows at once cannot all wait; none fails otherwise."""
    body, headers = binary_infer(np.zeros((4096, FEATURES)))

    def send(_):
        with server.client("prd1") as client:
            return client.post(INFER, content=body, headers=headers)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 1, statuses
    full = next(a for a in answers if a.status_code == 503)
    assert full.headers["retry-after"] == "1" and "AL_BATCH_QUEUE_ROWS" in full.json()["error"]


# --- concurrency per tenant: predicts, uploads, event streams -----------------------------------------


def test_predicts_uploads_and_streams_past_the_tenants_cap_get_429_with_retry_after(server):
    row = json.dumps({"inputs": [[0] * FEATURES]}).encode()
    json_type = {"Content-Type": "application/json"}
    held = [raw_request(server.port, "POST", "/v1/models/digits/predict", {**json_type, "Authorization":
                        "Bearer prd1"}, row[:10], declared=len(row)) for _ in range(MAX_PREDICTS)]
    with server.client("prd1") as t1, server.client("trn2") as t2:
        wait_for(lambda: t1.post("/v1/models/digits/predict", json={"inputs": [[0] * FEATURES]}).status_code == 429,
                 10, "the predict cap to be reached")
        past = t1.post("/v1/models/digits/predict", json={"inputs": [[0] * FEATURES]})
        assert past.headers["retry-after"] == "1" and "AL_MAX_CONCURRENT_PREDICTS" in past.json()["detail"]
        assert t2.post("/v1/models/digits/predict", json={"inputs": [[0]]}).status_code == 404  # t2 is not held
        for connection in held:
            connection.close()
        wait_for(lambda: t1.post("/v1/models/digits/predict", json={"inputs": [[0] * FEATURES]}).status_code == 200,
                 10, "the slots to come back")

        upload = raw_request(server.port, "POST", "/v1/datasets", {"Authorization": "Bearer trn1", "Content-Type":
                             "multipart/form-data; boundary=b0undary"}, b"--b0undary\r\n", declared=2_000_000)
        with server.client("trn1") as trn1:
            second = wait_for(lambda: (r := trn1.post("/v1/datasets", files={"file": ("d.csv", b"a,label\n")}))
                              .status_code == 429 and r, 10, "the upload cap")
            assert int(second.headers["retry-after"]) > 0 and "AL_MAX_CONCURRENT_UPLOADS" in second.json()["detail"]
            assert t2.post("/v1/datasets", files={"file": ("d.csv", b"a,label\n")}).status_code == 422  # not 429
            upload.close()
            wait_for(lambda: trn1.post("/v1/datasets", files={"file": ("d.csv", b"a,label\n")}).status_code == 422,
                     10, "the upload slot to come back")
        check_stream_cap(server)


def check_stream_cap(server: Served) -> None:
    with server.client("trn1") as t1, server.client("trn2") as t2:
        job = t1.post("/v1/jobs", json={"dataset": "digits"}).json()["id"]
        other = t2.post("/v1/jobs", json={"dataset": "digits"}).json()["id"]
        with t1.stream("GET", f"/v1/jobs/{job}/events") as first, t1.stream("GET", f"/v1/jobs/{job}/events") as second:
            assert first.status_code == second.status_code == 200
            past = t1.get(f"/v1/jobs/{job}/events")
            assert past.status_code == 429 and "AL_MAX_CONCURRENT_STREAMS" in past.json()["detail"]
            assert int(past.headers["retry-after"]) > 0
            with t2.stream("GET", f"/v1/jobs/{other}/events") as theirs:
                assert theirs.status_code == 200

        def reopened() -> bool:
            with t1.stream("GET", f"/v1/jobs/{job}/events") as again:
                return again.status_code == 200

        wait_for(reopened, 10, "closed streams to give their slots back")


# --- finding 4: the dashboard's session -------------------------------------------------------------------


def test_the_dashboard_session_is_no_key_and_its_writes_need_its_csrf_token(server):
    with server.client(None) as browser:
        link = browser.get("/ui/jobs?key=trn2", follow_redirects=False)
        assert link.status_code == 401 and "trn2" not in link.headers.get("set-cookie", "")  # main: 303, logged in
        assert browser.get("/v1/jobs").status_code == 401
        forged = browser.post("/ui/key", data={"key": "trn2", "target": "/ui/jobs"}, follow_redirects=False)
        assert forged.status_code == 403 and browser.get("/v1/jobs").status_code == 401  # another site's form
        assert dashboard_login(browser, "trn1").status_code == 303
        assert not any(key in str(browser.cookies.jar) for key in ("trn1", "trn2", "adm1"))
        with server.client("trn1") as api:
            study = api.post("/v1/studies", json={"name": "s", "dataset": "digits", "trials": 2, "space": {
                "training.lr": {"type": "float", "low": 0.001, "high": 0.01}}}).json()["id"]
        cancel = f"/v1/studies/{study}/cancel"
        cross_site = browser.post(cancel, data={"x": "1"}, headers={"Origin": "http://127.0.0.1:9999"})
        assert cross_site.status_code == 403 and "CSRF" in cross_site.json()["detail"]  # main: 202
        assert browser.get(f"/v1/studies/{study}").json()["status"] == "running"
        token = form_token(browser.get("/ui/jobs").text)
        assert browser.post(cancel, headers={"X-CSRF-Token": token}).status_code == 202
    with server.client(None, headers={"X-Forwarded-Proto": "https"}) as proxied:  # behind a TLS proxy
        assert "secure" in proxied.get("/ui/jobs").headers["set-cookie"].lower()
    with server.client(None) as plain:
        assert "secure" not in plain.get("/ui/jobs").headers["set-cookie"].lower()


# --- the stress run ---------------------------------------------------------------------------------------


def keyed_latencies(server: Served, clients: int, requests: int) -> list[float]:
    """Seconds per one-row predict, of `clients` keyed clients each sending `requests`; fails on any non-200."""
    row = {"inputs": [[0.5] * FEATURES]}

    def client_run(_):
        seconds = []
        with server.client("prd1") as client:
            for _ in range(requests):
                started = time.perf_counter()
                answer = client.post("/v1/models/digits/predict", json=row)
                seconds.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        return seconds

    with ThreadPoolExecutor(clients) as pool:
        return [s for run in pool.map(client_run, range(clients)) for s in run]


def flood(port: int, clients: int, stop, statuses) -> None:
    """`clients` threads each sending anonymous 16 MiB bodies, one after another, until `stop`; their statuses
    into `statuses`. In a process of its own, so the keyed clients' timings share no interpreter lock with it,
    and at the lowest priority: an attacker's CPU is not the server's, here they share two cores."""
    os.nice(19)
    body, headers = anonymous_16mib()
    seen, lock = [], threading.Lock()

    def anonymous():
        while not stop.is_set():
            status, _ = status_within(raw_request(port, "POST", INFER, headers, body), 30)
            with lock:
                seen.append(status)

    threads = [threading.Thread(target=anonymous) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses.put(seen)


def test_64_anonymous_clients_sending_16_mib_leave_keyed_predicts_unharmed(server):
    keyed_latencies(server, 8, 5)  # warm: connections, the model
    idle = np.percentile(keyed_latencies(server, 8, 40), 99)
    processes = multiprocessing.get_context("fork")
    stop, statuses = processes.Event(), processes.Queue()
    flooding = processes.Process(target=flood, args=(server.port, 64, stop, statuses))
    flooding.start()
    try:
        time.sleep(1)  # every anonymous client under way
        loaded = np.percentile(keyed_latencies(server, 8, 40), 99)
    finally:
        stop.set()
        answers = statuses.get(timeout=60)
        flooding.join()
    print(f"keyed predict p99: idle {1000 * idle:.1f} ms, with 64 anonymous 16 MiB senders {1000 * loaded:.1f} ms "
          f"({len(answers)} anonymous bodies sent)")
    assert len(answers) >= 64 and set(answers) == {401}
    # Refusing ~1,000 anonymous requests a second takes the server's CPU on two shared cores: p99 measured 36-125 ms
    # on 2-core machines. With refusals that read the body first (no `Connection: close`), 227-289 ms.
    bound = max(5 * idle, 0.2)
    assert loaded < bound, f"p99 {1000 * loaded:.1f} ms loaded against {1000 * idle:.1f} ms idle"


# --- schemathesis, stateful ----------------------------------------------------------------------------------


def test_schemathesis_stateful_with_keys_finds_no_server_error(server):
    """Links inferred from the schema and from Location headers (POST -> GET/cancel/DELETE), with an admin key of
    tenant t1; bounded in time."""
    command = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    run = subprocess.run(
        [command, "run", f"{server.url}/openapi.json", "-H", "Authorization: Bearer adm1", "--checks",
         "not_a_server_error", "--phases", "stateful", "--max-time", "40", "--seed", "1",
         "--request-timeout", "30", "--exclude-path-regex", "/events$"],
        capture_output=True, text=True, timeout=240)
    print(run.stdout[-1500:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Stateful" in run.stdout and "Skipped" not in run.stdout.split("Stateful", 1)[1][:200], run.stdout[-3000:]
