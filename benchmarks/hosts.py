"""Separate hosts on one Linux machine: network namespaces that share only a private bridge.

Each host is a namespace with its own loopback and one address on 10.231.0.0/24. The bridge lives in
a namespace of its own, so no traffic of these hosts reaches the machine's network or another run's
hosts. Making namespaces needs root; `unavailable_reason()` says why it cannot be done here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass

SUBNET = "10.231.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def pids(self) -> list[int]:
        found = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True)
        return [int(p) for p in found.stdout.split()]


class Hosts:
    """`count` hosts for the length of a `with` block; every process left inside them is killed at its end."""

    def __init__(self, count: int):
        tag = uuid.uuid4().hex[:6]
        self.switch = f"al-{tag}-sw"
        self.hosts = [Host(f"al-{tag}-{i}", f"{SUBNET}.{i + 1}") for i in range(count)]

    def __enter__(self) -> list[Host]:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                _ip("netns", "add", host.namespace)
                _ip("-n", self.switch, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                    "netns", host.namespace)
                _ip("-n", self.switch, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def __exit__(self, *_) -> None:
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for namespace in [h.namespace for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def unavailable_reason() -> str | None:
    """Why namespaced hosts cannot be made on this machine; None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    try:
        with Hosts(1):
            pass
    except subprocess.CalledProcessError as e:
        return f"cannot make a network namespace here: {e.stderr.strip() or e}"
    return None
