"""A pipeline job over several workers: stage k of a `processes` pipeline trains in the k-th worker, on any host.

The worker that takes the job's lease trains stage 0 and does all that an attempt does: checkpoints,
progress, the result. It opens the attempt's rendezvous store (torch's TCPStore) on its stage address
only, publishes the rendezvous in the job store (that address, the store's port, the attempt) and sends
one stage message per other stage. The workers that take those join it as ranks 1.. through
torch.distributed, under torchrun's contract (al/pipeline/launch.py), and train their stage until rank 0
says stop. A rendezvous names its attempt: a stage message of an attempt that is over does nothing. A
stage that dies ends the attempt (gloo sees the closed socket, or the stage timeout ends the wait), and
the job resumes from its checkpoint (worker/tasks.py).

Stage traffic is tensors and JSON (al/pipeline/transport.py), never pickle, but anyone who reaches the
rendezvous can join it and feed the stages: it belongs on a private network (docs/deploy.md), on the
address AL_STAGE_ADDRESS names, and gloo's sockets on the interface that holds it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from urllib.parse import urlparse

import psutil
import torch.distributed as dist

from service.jobspec import pipeline_workers
from service.settings import Settings
from service.store import JobRow, Store

# This pool process's rendezvous store and its listening socket, for the one attempt it runs (a pool process runs
# one job: worker_max_tasks_per_child=1): the store serves the ranks until the process ends.
_rendezvous: list = []


def route_address(toward: str) -> str:
    """This host's address on its route to `toward` (connecting a UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((toward, 9))
        return s.getsockname()[0]


def interface_of(address: str) -> str:
    """The network interface that holds `address` on this host, or whose network holds it (127.0.0.2 is the
    loopback's)."""
    wanted = ipaddress.ip_address(address)
    held = [(name, ipaddress.ip_interface(f"{a.address}/{a.netmask}"))
            for name, addresses in psutil.net_if_addrs().items()
            for a in addresses if a.family == socket.AF_INET and a.netmask]
    for name, interface in held:
        if interface.ip == wanted:
            return name
    for name, interface in held:
        if wanted in interface.network:
            return name
    raise ValueError(f"no network interface of this host has the address {address} (AL_STAGE_ADDRESS?)")


def stage_zero_address(settings: Settings) -> str:
    """Where the other stages reach this host: AL_STAGE_ADDRESS, else the address on the route to the broker
    (or the database), which every worker reaches."""
    if settings.stage_address:
        return settings.stage_address
    shared = urlparse(settings.redis_url or settings.database_url or "").hostname
    return route_address(socket.gethostbyname(shared)) if shared else "127.0.0.1"


def open_rendezvous(address: str, workers: int) -> int:
    """The attempt's rendezvous store, listening on `address` only (torch's own would listen on every address);
    its port. Every rank, this one too, joins it as a client (TORCHELASTIC_USE_AGENT_STORE, as under torchrun's
    agent)."""
    listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    listener.bind((address, 0))
    listener.listen()
    store = dist.TCPStore(address, listener.getsockname()[1], workers, is_master=True, wait_for_workers=False,
                          master_listen_fd=listener.fileno())
    _rendezvous[:] = [listener, store]
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    return store.port


def start_stages(store: Store, settings: Settings, job: JobRow, owner: str,
                 send_stage: Callable[[str, int, int], None]) -> None:
    """As stage 0 of the job's attempt: open and publish where the other stages meet it, join as rank 0, send
    them."""
    workers, address = pipeline_workers(job.spec), stage_zero_address(settings)
    rendezvous = {"address": address, "port": open_rendezvous(address, workers), "workers": workers,
                  "attempt": job.attempts}
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
