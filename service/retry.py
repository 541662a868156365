"""Retrying through an outage, once for the whole service: `Retrying(store, seconds)` is the store whose every
call is tried again while the database does not answer (a restart, a failover), for up to `seconds`; then
the error is raised. The worker reaches the job store and the artifact store through it, so a short outage
pauses a training job instead of failing it."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class Retrying:
    def __init__(self, target: Any, seconds: float, errors: tuple[type[Exception], ...], what: str):
        self.once = target  # the same object without retries: for callers whose own loop retries
        self.seconds, self.errors, self.what = seconds, errors, what

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.once, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def retried(*args, **kwargs):
            deadline = time.monotonic() + self.seconds
            while True:
                try:
                    return attribute(*args, **kwargs)
                except self.errors as e:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("%s does not answer (%s); retrying in 1 s", self.what, str(e).splitlines()[0][:200])
                    time.sleep(1)

        return retried
