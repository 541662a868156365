"""`al serve`, added to the `al` command through the entry-point group `al.commands` (pyproject.toml).

Cheap to import: the server (FastAPI, uvicorn, torch) loads when the command runs."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="the HTTP API and a training worker (see docs/service.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--no-worker", action="store_true", help="the API only (also AL_EMBEDDED_WORKER=0)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    from app.serve import serve
    from service.settings import get_settings

    serve(get_settings(), args.host, args.port, args.no_worker)
