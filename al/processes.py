"""A child process that must not outlive its parent: `al serve`'s worker, a worker's pool processes, a
pipeline's stage processes."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends, so a SIGKILLed parent (`al serve`,
    a Celery pool process) leaves no child training a job or holding memory or a GPU. `parent` is the pid the
    parent had: a parent that died before prctl took effect ends this process at once."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
