"""`al worker`, added to the `al` command through the entry-point group `al.commands` (pyproject.toml).

Cheap to import: the worker (Celery, torch) loads when the command runs."""

from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("worker", help="a training worker alone (REDIS_URL, or the embedded broker in AL_DATA_DIR)")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args) -> None:
    from service.settings import get_settings
    from worker.main import run_worker

    run_worker(get_settings())
