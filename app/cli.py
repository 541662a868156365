"""`al serve` and `al worker`, registered into the `al` command line by al/cli.py."""

from __future__ import annotations

import signal
import subprocess
import sys


def cmd_serve(args) -> None:
    import torch
    import uvicorn

    from app.core.config import get_settings
    from app.main import create_app
    from worker.main import die_with_parent

    settings = get_settings()
    # Requests arrive spaced out: a second intra-op thread has gone to sleep by the next one and,
    # on a busy CPU, waking it costs more than it saves (64 rows: 44 ms with 2 threads, 6 ms with 1).
    torch.set_num_threads(settings.inference_threads)
    app = create_app(settings)  # creates the data directory and the store's tables before the worker starts
    worker = None
    if settings.embedded_worker and not args.no_worker:
        worker = subprocess.Popen([sys.executable, "-m", "al.cli", "worker"], preexec_fn=die_with_parent)
    broker = "Redis" if settings.redis_url else f"embedded ({settings.broker_dir})"
    print(f"al serve: http://{args.host}:{args.port} (API docs at /docs); data in {settings.data_dir.resolve()}; "
          f"broker {broker}; worker {'started' if worker else 'not started'}", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would end this
    # process on the spot, and its worker with it (die_with_parent) before the worker could hand back
    # its job. A handler that does nothing lets the `finally` below stop the worker in order.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        if worker is not None:
            stop_worker(worker)


def stop_worker(worker: subprocess.Popen, grace: float = 30.0) -> None:
    """Ask the worker to stop: its job checkpoints at the current step and goes back to the queue.
    A worker still running after `grace` seconds is killed; its job then resumes from its last epoch."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def cmd_worker(args) -> None:
    from app.core.config import get_settings
    from worker.main import run_worker

    run_worker(get_settings())


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="the HTTP API and a training worker (see docs/service.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--no-worker", action="store_true", help="the API only (also AL_EMBEDDED_WORKER=0)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a training worker alone (REDIS_URL, or the embedded broker in AL_DATA_DIR)")
    p.set_defaults(func=cmd_worker)
