"""`al serve`: the HTTP API in this process and, unless told not to, a training worker beside it."""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import subprocess
import sys
from functools import partial

import torch
import uvicorn

from al.processes import die_with_parent
from app.main import create_app
from service.settings import Settings

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
    # Requests arrive spaced out: a second intra-op thread has gone to sleep by the next one and,
    # on a busy CPU, waking it costs more than it saves (64 rows: 44 ms with 2 threads, 6 ms with 1).
    torch.set_num_threads(settings.inference_threads)
    app = create_app(settings)  # creates the data directory and the store's tables before the worker starts
    # Everything imported so far (torch, FastAPI, SQLAlchemy, Celery: most of the heap) lives as long as the
    # process. Kept out of the collector's sight, a full collection under load took a few ms instead of about
    # 130 ms, which every request in flight waited out (measured at 32 concurrent clients).
    gc.freeze()
    worker = None
    if settings.embedded_worker and not no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "al.cli", "worker"],
                                  preexec_fn=partial(die_with_parent, os.getpid()))
    broker = "Redis" if settings.redis_url else f"embedded ({settings.broker_dir})"
    docs = "API docs at /docs" if settings.docs_enabled else "API docs off (AL_DOCS)"
    print(f"al serve: http://{host}:{port} ({docs}); data in {settings.data_dir.resolve()}; "
          f"broker {broker}; worker {'started' if worker else 'not started'}", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would end this
    # process on the spot, and its worker with it (die_with_parent) before the worker could hand back
    # its job. A handler that does nothing lets the `finally` below stop the worker in order.
    signal.signal(signal.SIGTERM, lambda *_: None)
    config = uvicorn.Config(app, host=host, port=port, log_level="info")  # sets up uvicorn's loggers
    logging.getLogger("uvicorn.access").addFilter(HideKeyParameter())
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        if worker is not None:
            stop_worker(worker)
    if not server.started:  # as uvicorn.run: e.g. the port is taken
        sys.exit(3)


def stop_worker(worker: subprocess.Popen, grace: float = 30.0) -> None:
    """Ask the worker to stop: its job checkpoints at the current step and goes back to the queue.
    A worker still running after `grace` seconds is killed; its job then resumes from its last epoch."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
