"""`al serve`: the HTTP API in AL_WEB_WORKERS processes and, unless told not to, a training worker beside them.

With one API process it runs in this process. With several, this process starts them (spawned: each imports and
builds the app itself, `api_process`) and watches them. Each listens on the port with a socket of its own
(SO_REUSEPORT), so the kernel spreads new connections over them evenly, and each has its own event loop, loaded
models, batcher and inference thread. What they must share they get from the environment this process sets before
they start (`shared_environment`); the store's tables and the worker are made once, here.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from functools import partial
from multiprocessing.connection import wait

import torch
import uvicorn
from fastapi import FastAPI

from al.processes import die_with_parent
from app.main import create_app, prepare
from service.settings import Settings, get_settings

API = "app.serve:api_process"  # uvicorn's factory of one API process's app
log = logging.getLogger("uvicorn.error")  # where uvicorn's own messages go: ours read alike
# The dashboard once took a key as `?key=`; it reads none from an address now, but old links still carry one,
# and uvicorn's access log shows query strings.
KEY_PARAMETER = re.compile(r"(?<=[?&])key=[^&\s]*")


class HideKeyParameter(logging.Filter):
    """Access log lines with the `key` query parameter's value left out: keys are never logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query string, HTTP version, status)
        if isinstance(record.args, tuple) and len(record.args) > 2 and isinstance(record.args[2], str):
            record.args = (*record.args[:2], KEY_PARAMETER.sub("key=<hidden>", record.args[2]), *record.args[3:])
        return True


def serve(settings: Settings, host: str, port: int, no_worker: bool) -> None:
    prepare(settings)  # the data directory and the store's tables, before the worker and the API processes start
    metrics_dir = shared_environment(settings)
    worker = None
    if settings.embedded_worker and not no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "al.cli", "worker"],
                                  preexec_fn=partial(die_with_parent, os.getpid()))
    broker = "Redis" if settings.redis_url else f"embedded ({settings.broker_dir})"
    docs = "API docs at /docs" if settings.docs_enabled else "API docs off (AL_DOCS)"
    print(f"al serve: http://{host}:{port} ({docs}); {settings.web_workers} API process(es) (AL_WEB_WORKERS); "
          f"data in {settings.data_dir.resolve()}; broker {broker}; worker {'started' if worker else 'not started'}",
          flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would end this
    # process on the spot, and its worker with it (die_with_parent) before the worker could hand back
    # its job. A handler that does nothing lets the `finally` below stop the worker in order.
    signal.signal(signal.SIGTERM, lambda *_: None)
    config = uvicorn.Config(API, factory=True, host=host, port=port, log_level="info", access_log=settings.access_log)
    try:
        if settings.web_workers == 1:
            server = uvicorn.Server(config)
            server.run()
            if not server.started:  # as uvicorn.run: e.g. the port is taken
                sys.exit(3)
        else:
            supervise(config, settings.web_workers)
    finally:
        if worker is not None:
            stop_worker(worker)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def supervise(config: uvicorn.Config, processes: int) -> None:
    """Several API processes, until SIGTERM or SIGINT; status 3 when the port is taken. One that ends on its
    own ends them all (status 1), as the one API process ending ends `al serve`: a process manager restarts it.

    Each has a socket of its own: with one socket shared by all (uvicorn's and gunicorn's workers), the process
    that woke first accepted every connection of a burst: 32 clients connecting at once all went to one."""
    sockets = reuse_port_sockets(config.host, config.port, processes)
    spawn = multiprocessing.get_context("spawn")
    running = [spawn.Process(target=run_api_process, args=(config, sock), name="al-api") for sock in sockets]
    for process in running:
        process.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("Started %d API processes: %s", processes, ", ".join(str(p.pid) for p in running))
    ended = []
    while not stop.is_set() and not ended:
        ended = wait([p.sentinel for p in running], timeout=0.5)
    for process in running:
        process.terminate()  # SIGTERM: each finishes the requests it holds, as one process does
    for process in running:
        process.join()
    if ended and not stop.is_set():
        died = next(p for p in running if p.sentinel in ended)
        log.error("API process %d ended (exit code %s); stopping al serve", died.pid, died.exitcode)
        sys.exit(1)


def reuse_port_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to host:port with SO_REUSEPORT. The port must be free first: a socket without it
    binds once to find out, so a second `al serve` on a port taken by one with several processes fails (status 3)
    instead of joining them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
            probe.bind((host, port))
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        log.error(e)
        sys.exit(3)  # uvicorn's status when it cannot start
    log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", f"[{host}]" if ":" in host else host, port)
    return sockets


def run_api_process(config: uvicorn.Config, sock: socket.socket) -> None:
    """One of several API processes (spawned), serving on its socket until SIGTERM."""
    config.configure_logging()  # as uvicorn's own workers: a spawned process starts without it
    uvicorn.Server(config).run(sockets=[sock])


def shared_environment(settings: Settings) -> str | None:
    """What every API process must share, set in the environment they inherit: the secret that signs the
    dashboard's session cookie (a browser's next request may reach another process), and with several processes
    a fresh directory for their metrics (prometheus-client's multiprocess mode), which is returned."""
    os.environ.setdefault("AL_SESSION_SECRET", secrets.token_urlsafe(32))
    if settings.web_workers == 1:
        return None
    metrics_dir = tempfile.mkdtemp(prefix="al-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    return metrics_dir


def api_process() -> FastAPI:
    """The app of one API process, settings from the environment (uvicorn's factory)."""
    supervisor = multiprocessing.parent_process()
    if supervisor is not None:  # one of several: it must not outlive a SIGKILLed `al serve`, holding the port
        die_with_parent(supervisor.pid)
    settings = get_settings()
    # Requests arrive spaced out: a second intra-op thread has gone to sleep by the next one and,
    # on a busy CPU, waking it costs more than it saves (64 rows: 44 ms with 2 threads, 6 ms with 1).
    torch.set_num_threads(settings.inference_threads)
    app = create_app(settings)
    logging.getLogger("uvicorn.access").addFilter(HideKeyParameter())  # after uvicorn has set up its loggers
    # Everything imported so far (torch, FastAPI, SQLAlchemy, Celery: most of the heap) lives as long as the
    # process. Kept out of the collector's sight, a full collection under load took a few ms instead of about
    # 130 ms, which every request in flight waited out (measured at 32 concurrent clients).
    gc.freeze()
    return app


def stop_worker(worker: subprocess.Popen, grace: float = 30.0) -> None:
    """Ask the worker to stop: its job checkpoints at the current step and goes back to the queue.
    A worker still running after `grace` seconds is killed; its job then resumes from its last epoch."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
