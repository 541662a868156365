"""Issue 23, serving under load: a real `al serve` with AL_WEB_WORKERS=2 (two API processes, no worker). Both
processes listen on the port and hold some of 32 clients' connections; /metrics, whichever process answers it,
counts every predict of both; a dashboard session made through one is good in the other; the access log has a
line per request, or none with AL_ACCESS_LOG=0; SIGTERM stops both and removes their metrics' directory, and a
SIGKILLed `al serve` takes them with it."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from service_support import (
    TINY_MODEL,
    dashboard_login,
    digits_rows,
    free_port,
    register_model,
    service_env,
    start_server,
    use_env,
    wait_for,
)

from al.config import make_config
from al.run import train

KEY = "adm-serving"
CLIENTS, PER_CLIENT = 32, 10
PREDICT = "/v1/models/digits/predict"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serving") / "model"
    train("digits", directory, make_config(model=TINY_MODEL, training={"epochs": 1, "device": "cpu"}))
    return directory


def start(root: Path, model_dir: Path, **extra: str):
    """`al serve` with two API processes and the API only, "digits" v1 registered; (process, port, API pids)."""
    env = service_env(root / "data", None, AL_WEB_WORKERS="2", AL_EMBEDDED_WORKER="0", AL_API_KEYS=KEY, **extra)
    (root / "data").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        register_model(use_env(patch, env), model_dir)
    port = free_port()
    server = start_server(env, root / "serve.log", port)
    apis = wait_for(lambda: api_processes(server.popen.pid, port), 60, "two API processes listening")
    return server, port, apis


def api_processes(pid: int, port: int) -> list[psutil.Process] | None:
    """The children of `al serve` that listen on the port, once there are two."""
    listening = [child for child in psutil.Process(pid).children()
                 if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp"))]
    return listening if len(listening) == 2 else None


def connections_held(apis: list[psutil.Process], port: int) -> list[int] | None:
    """The clients' connections each API process holds, once they hold all of them."""
    held = [sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in api.net_connections("tcp"))
            for api in apis]
    return held if sum(held) == CLIENTS else None


def post_predict(connection: http.client.HTTPConnection) -> int:
    connection.request("POST", PREDICT, body=json.dumps({"inputs": digits_rows(1)}),
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def test_two_api_processes_share_the_clients_and_their_metrics_add_up(tmp_path, model_dir):
    server, port, apis = start(tmp_path, model_dir)
    metrics_dir = Path(apis[0].environ()["PROMETHEUS_MULTIPROC_DIR"])  # a fresh one for each start
    try:
        # 32 clients connect at once, as a connection pool does. The kernel hands each connection to one process's
        # socket (SO_REUSEPORT): each holds about half. (With one socket for both, the process that woke first
        # took them all.) Then every client predicts on its connection.
        clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(CLIENTS)]
        for client in clients:
            client.connect()
        held = wait_for(lambda: connections_held(apis, port), 30, "the API processes to accept every connection")
        assert min(held) >= CLIENTS // 8, held
        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for mine in pool.map(lambda c: [post_predict(c) for _ in range(PER_CLIENT)], clients)
                        for s in mine]
        for client in clients:
            client.close()
        assert statuses == [200] * CLIENTS * PER_CLIENT

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}) as api:
            metrics = api.get("/metrics").text  # answered by one process, counting both
        counted = re.search(r'al_http_requests_total\{method="POST",route="/v1/models/\{name\}/predict",'
                            r'status="200"\} (\S+)', metrics)
        assert counted and float(counted[1]) == CLIENTS * PER_CLIENT, metrics[:3000]
        lines = re.findall(r'"POST /v1/models/digits/predict HTTP/1.1" 200', server.output())
        assert len(lines) == CLIENTS * PER_CLIENT  # the access log (on by default): a line per request

        # The dashboard's session cookie, signed by one process, is good in the other: every request on a
        # connection of its own (either process), with the session alone, is let in.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as browser:
            assert dashboard_login(browser, KEY).status_code == 303
            answers = [browser.get("/v1/models", headers={"Connection": "close"}).status_code for _ in range(20)]
        assert answers == [200] * 20
        assert metrics_dir.is_dir()
    finally:
        server.popen.send_signal(signal.SIGTERM)
        try:
            status = server.popen.wait(30)
        finally:
            server.stop()
    assert status == 0, server.output()[-3000:]
    assert not any(psutil.pid_exists(a.pid) for a in apis) and not metrics_dir.exists()


def test_without_the_access_log_and_sigkilled_the_api_processes_go_with_it(tmp_path, model_dir):
    server, port, apis = start(tmp_path, model_dir, AL_ACCESS_LOG="0")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}) as api:
            assert all(api.post(PREDICT, json={"inputs": digits_rows(1)}).status_code == 200 for _ in range(20))
        assert "/v1/models/digits/predict" not in server.output()
        os.kill(server.popen.pid, signal.SIGKILL)
        wait_for(lambda: not any(psutil.pid_exists(a.pid) for a in apis), 10, "the API processes to end")
        with socket.socket() as again:  # nothing holds the port
            again.bind(("127.0.0.1", port))
    finally:
        server.stop()
