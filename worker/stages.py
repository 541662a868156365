"""A pipeline job over several workers: stage k of a `processes` pipeline trains in the k-th worker, on any host.

The worker that takes the job's lease trains stage 0 and does all that an attempt does: checkpoints,
progress, the result. It publishes a rendezvous in the job store (its address, a free port, the
attempt) and sends one stage message per other stage. The workers that take those join it as ranks
1.. through torch.distributed, under torchrun's contract (al/pipeline/launch.py), and train their
stage until rank 0 says stop. A rendezvous names its attempt: a stage message of an attempt that is
over does nothing. A stage that dies ends the attempt (gloo sees the closed socket, or the stage
timeout ends the wait), and the job resumes from its checkpoint (worker/tasks.py).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Callable
from urllib.parse import urlparse

from service.jobspec import pipeline_workers
from service.settings import Settings
from service.store import JobRow, Store

SIOCGIFADDR = 0x8915  # <linux/sockios.h>: an interface's IPv4 address


def route_address(toward: str) -> str:
    """This host's address on its route to `toward` (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((toward, 9))
        return s.getsockname()[0]


def interface_of(address: str) -> str:
    """The network interface that holds `address` on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                request = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(request[20:24]) == address:
                return name
    raise ValueError(f"no network interface of this host has the address {address} (AL_STAGE_ADDRESS?)")


def stage_zero_address(settings: Settings) -> str:
    """Where the other stages reach this host: AL_STAGE_ADDRESS, else the address on the route to the broker
    (or the database), which every worker reaches."""
    if settings.stage_address:
        return settings.stage_address
    shared = urlparse(settings.redis_url or settings.database_url or "").hostname
    return route_address(socket.gethostbyname(shared)) if shared else "127.0.0.1"


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def start_stages(store: Store, settings: Settings, job: JobRow, owner: str,
                 send_stage: Callable[[str, int, int], None]) -> None:
    """As stage 0 of the job's attempt: publish where the other stages meet it, join as rank 0, send them."""
    workers, address = pipeline_workers(job.spec), stage_zero_address(settings)
    rendezvous = {"address": address, "port": free_port(address), "workers": workers, "attempt": job.attempts}
    store.publish_rendezvous(job.id, owner, rendezvous)
    join_as(rendezvous, 0)
    for rank in range(1, workers):
        send_stage(job.id, rank, job.attempts)


def join_as(rendezvous: dict, rank: int) -> None:
    """torchrun's environment for `rank` (al/pipeline/launch.py reads it), in this job's own pool process (one per
    job: worker_max_tasks_per_child=1). Gloo is told the interface: it would otherwise take the address that the
    host name resolves to, often a loopback one that no other host reaches."""
    local = rendezvous["address"] if rank == 0 else route_address(rendezvous["address"])
    os.environ.update(MASTER_ADDR=rendezvous["address"], MASTER_PORT=str(rendezvous["port"]), RANK=str(rank),
                      WORLD_SIZE=str(rendezvous["workers"]), GLOO_SOCKET_IFNAME=interface_of(local))
