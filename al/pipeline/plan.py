"""Planning: which components each stage trains, on which device, with how many threads.

The split is given (`stages="0-1,2-3"`), one component a stage where there are as many devices
as components, or else balanced by measured time, as torchgpipe's `balance_by_time`: each component
is timed on a copy, so training is untouched.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from al.config import TrainConfig
from al.local import Work
from al.pipeline.stage import Stage, intra_op_threads

PROFILE_STEPS = 3


@dataclass
class Plan:
    stages: list[Stage]
    threads: int  # CPU intra-op threads per stage
    component_seconds: list[float] | None  # measured seconds per mini-batch of each component, when balanced


def parse_stages(text: str, depth: int) -> list[range]:
    """'0-1,2-3' -> [range(0, 2), range(2, 4)]; the groups must cover 0..depth-1 in order."""
    groups = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            groups.append(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"stages must look like 0-1,2-3, got {text!r}") from None
    if [c for g in groups for c in g] != list(range(depth)) or any(len(g) == 0 for g in groups):
        raise ValueError(f"stages {text!r} must list the components 0..{depth - 1} once each, in order")
    return groups


def balance_by_time(seconds: list[float], parts: int) -> list[range]:
    """Consecutive groups of components such that the slowest group is as fast as possible."""
    n = len(seconds)
    prefix = [0.0, *itertools.accumulate(seconds)]
    # best[k, j]: (time of the slowest group, groups) for the first j components in k groups
    best = {(0, 0): (0.0, [])}
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            best[k, j] = min(
                ((max(best[k - 1, i][0], prefix[j] - prefix[i]), [*best[k - 1, i][1], range(i, j)])
                 for i in range(k - 1, j) if (k - 1, i) in best),
                key=lambda candidate: candidate[0],
            )
    return best[parts, n][1]


def measure_component_seconds(work: Work, x: torch.Tensor, y: torch.Tensor, threads: int,
                              steps: int = PROFILE_STEPS) -> list[float]:
    """Seconds per mini-batch of each component on (x, y), timed on copies so that training is untouched."""
    s, t = x, F.one_hot(y, work.num_classes).float()
    seconds = []
    synchronize = torch.cuda.synchronize if work.device.type == "cuda" else lambda: None
    with intra_op_threads(threads):
        for trainer in work.component_trainers:
            probe = copy.deepcopy(trainer)
            probe.step(s, t, y, (1.0, 1.0))  # warm-up: first-call allocations and kernel selection
            synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                s_next, t_next, _, _ = probe.step(s, t, y, (1.0, 1.0))
            synchronize()
            seconds.append((time.perf_counter() - started) / steps)
            s, t = s_next, t_next
    return seconds


def default_devices(work: Work, count: int | None) -> list[str]:
    """One stage per CPU core (or per GPU), at most one per component; `count` stages under torchrun."""
    depth = len(work.component_trainers)
    if work.device.type == "cuda":
        gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        n = count or min(depth, len(gpus))
        return [gpus[i % len(gpus)] for i in range(n)]
    return ["cpu"] * (count or max(1, min(depth, os.cpu_count() or 1)))


def plan(work: Work, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, world: int | None = None) -> Plan:
    """The stages for `work`; (x, y) is a mini-batch to time the components on; `world`: torchrun's rank count."""
    depth = len(work.component_trainers)
    devices = list(cfg.devices or default_devices(work, world))
    if world and len(devices) != world:
        raise ValueError(f"torchrun started {world} ranks for {len(devices)} devices: one per stage")
    if len(devices) > depth:
        raise ValueError(f"{len(devices)} devices for {depth} components: one stage needs a component")
    cpu_stages = sum(torch.device(d).type == "cpu" for d in devices)
    threads = cfg.stage_threads or max(1, (os.cpu_count() or 1) // max(cpu_stages, 1))
    component_seconds = None
    if cfg.stages:
        groups = parse_stages(cfg.stages, depth)
        if len(groups) != len(devices):
            raise ValueError(f"stages {cfg.stages!r} make {len(groups)} stages for {len(devices)} devices")
    elif len(devices) == depth:  # a component a stage: there is one split, and timing it would cost the run
        groups = [range(i, i + 1) for i in range(depth)]
    else:
        component_seconds = measure_component_seconds(work, x, y, threads)
        groups = balance_by_time(component_seconds, len(devices))
    stages = [Stage(i, group, device) for i, (group, device) in enumerate(zip(groups, devices))]
    return Plan(stages, threads, component_seconds)
