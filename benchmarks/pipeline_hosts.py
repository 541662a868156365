"""`al bench hosts`: pipelined AL with one stage per host, what crosses between the hosts, and
the schedule model's figures for more hosts, from what was measured.

The hosts are network namespaces on one machine (benchmarks/hosts.py), so they share its cores and
memory: the link is real TCP through veth pairs and a bridge, the cores are not each host's own.
Each host runs one rank, `python -m benchmarks.pipeline_hosts RUN_JSON` with torchrun's variables
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank k trains stage k, as under torchrun.

Rank 0 measures, besides what `one_run` measures:
- traffic per step: the bytes through its host's eth0 in epoch 2 (/proc/net/dev is per namespace,
  and the counters are the kernel's), divided by the batches. Out is the epoch's command and its
  batches to stage 1 (s, t, labels); in is the loss reports and, at the epoch's end, the pull of
  the other stages' state (weights and optimizer state), which rank 0 does at every sync. Both with
  TCP/IP headers and acknowledgements.
- the link: after training, ranks 0 and 1 stream LINK_MESSAGES messages of one step's out bytes
  from host 0 to host 1 over gloo, as the pipeline's send thread does; link s = the time per message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from al.trainer import Callback
from benchmarks.hosts import Hosts, unavailable_reason
from benchmarks.pipeline import median_run, one_run, predicted_seconds, vars_of
from benchmarks.report import destination, publish
from benchmarks.runs import case_model, fresh_process, run_result, subset_file

PORT = 29500  # any port: each run's hosts have a network of their own
LINK_MESSAGES = 200  # under a second of streaming, long enough that one descheduled moment weighs little
MODEL_HOSTS = (2, 4, 8, 16)


def eth0_bytes() -> tuple[int, int]:
    """(received, sent) bytes of this network namespace's eth0."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "eth0":
            fields = counters.split()
            return int(fields[0]), int(fields[8])
    raise RuntimeError("this host has no eth0")


class Traffic(Callback):
    """eth0's counters at the end of each epoch, after its sync: what an epoch moved, per batch.

    Per step within an epoch would be inexact: a step counts when its report reaches rank 0, and a
    sender may run several batches ahead of the reports, into the socket's buffer."""

    def __init__(self):
        self.marks: list[tuple[int, int]] = []  # received, sent

    def on_epoch_end(self, trainer, metrics) -> None:
        self.marks.append(eth0_bytes())

    def per_step(self, steps: int) -> dict:
        (received, sent), (received_end, sent_end) = self.marks[-2:]
        return {"bytes_out_per_step": (sent_end - sent) / steps, "bytes_in_per_step": (received_end - received) / steps}


def link_seconds(rank: int, message_bytes: int = 0) -> float:
    """Ranks 0 and 1: seconds per message of rank 0's `message_bytes` streamed to rank 1 over gloo."""
    address = f"tcp://{os.environ['MASTER_ADDR']}:{PORT + 1}"  # the training group's port may still linger
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=2)
    size = torch.tensor([message_bytes // 4])
    dist.broadcast(size, 0)  # rank 1 learns the size from rank 0
    message = torch.zeros(int(size))
    dist.barrier()
    started = time.perf_counter()
    for _ in range(LINK_MESSAGES):
        dist.send(message, 1) if rank == 0 else dist.recv(message, 0)
    dist.barrier()  # the last message has arrived
    seconds = (time.perf_counter() - started) / LINK_MESSAGES
    dist.destroy_process_group()
    return seconds


def rank_run(spec: dict) -> dict:
    """One host's part of a run: train (rank 0) or serve a stage (rank > 0), then time the link (ranks 0, 1)."""
    rank = int(os.environ["RANK"])
    traffic = Traffic()
    result = one_run(spec, [traffic])
    if rank == 0:
        result.update(traffic.per_step(result["batches"]))
        result["link_seconds"] = link_seconds(0, int(result["bytes_out_per_step"]))
    elif rank == 1:
        link_seconds(1)
    return result


def run_on_hosts(spec: dict, count: int) -> dict:
    """A run with rank k on host k, fresh hosts each time; rank 0's result."""
    with Hosts(count) as hosts:
        # gloo binds to the address the hostname resolves to, often 127.0.0.1 (/etc/hosts), which the
        # other hosts cannot reach; the interface's name makes it bind to the host's bridge address.
        environment = {**os.environ, "MASTER_ADDR": hosts[0].address, "MASTER_PORT": str(PORT),
                       "WORLD_SIZE": str(count), "GLOO_SOCKET_IFNAME": "eth0"}
        ranks = [subprocess.Popen(host.command(fresh_process("benchmarks.pipeline_hosts", spec)),
                                  env={**environment, "RANK": str(k)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for k, host in enumerate(hosts)]
        stdout, stderr = ranks[0].communicate(timeout=1800)
        result = run_result(spec, ranks[0].returncode, stdout, stderr)  # a failure: leaving the block kills all
        for rank in ranks[1:]:
            stdout, stderr = rank.communicate(timeout=60)
            run_result(spec, rank.returncode, stdout, stderr)
    return result


def bench_hosts(args) -> None:
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"al bench hosts: the hosts are network namespaces, and {reason}")
    cases = [(arch, depth) for arch in args.archs for depth in args.depths]
    runs: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_file(args.dataset, args.samples, Path(tmp)))
        for _ in range(args.repeats):  # rounds over the cases, so that a change in load hits all alike
            for arch, depth in cases:
                spec = {"data": data, "model": case_model(arch, depth, args.mlp_width), "threads": 1,
                        "training": {"batch_size": args.batch_size, "device": "cpu", "schedule": "none",
                                     "pipeline": "processes", "devices": ["cpu"] * args.hosts}}
                result = run_on_hosts(spec, args.hosts)
                runs[arch, depth].append({"arch": arch, "components": depth, "spec": spec, **result})
                print(f"{arch} L={depth} on {args.hosts} hosts: {result['samples_per_second']:.0f} samples/s, "
                      f"{result['bytes_out_per_step'] / 2**10:.0f} KiB out per step, "
                      f"link {1000 * result['link_seconds']:.2f} ms", file=sys.stderr)
    medians = [median_run(runs[case]) for case in cases]
    raw = {"runs": [r for case in cases for r in runs[case]], "settings": vars_of(args),
           "load_average": open("/proc/loadavg").read().split()[:3]}
    where = destination(args)
    publish(where, name="pipeline-hosts-cpu",
            title=f"Pipelined AL across {args.hosts} hosts (network namespaces on one machine): {args.dataset} "
            f"({args.samples} samples), batch {args.batch_size}, epoch 2 of 2, median of {args.repeats}",
            columns=["arch", "components", "hosts", "samples/s", "range", "stage busy s", "KiB out per step",
                     "KiB in per step", "link ms per step", "transfer %", "bubble %", "model samples/s"],
            rows=[measured_row(r, args) for r in medians], notes=NOTES, raw=raw)
    publish(where, name="pipeline-hosts-model-cpu",
            title="Pipelined AL across hosts: the schedule model, from the measured stage and link times",
            columns=["arch", "components", "hosts L", "stage ms", "link ms", "predicted samples/s",
                     "without transfer", "measured samples/s"],
            rows=[row for r in medians for row in model_rows(r, args.batch_size)], notes=MODEL_NOTES,
            raw={"settings": vars_of(args)})


def per_batch(result: dict) -> tuple[list[float], float, int]:
    """A run's compute seconds per batch of each stage, its link seconds per step, its batches."""
    batches = result["batches"]
    return [b / batches for b in result["busy_seconds"]], result["link_seconds"], batches


def with_hops(stage_seconds: list[float], link: float, batches: int) -> float:
    """The schedule model with a hop of `link` seconds between each two stages: a hop is a part of the
    pipeline of its own, since each rank sends on a thread of its own while it computes the next batch."""
    return predicted_seconds([part for t in stage_seconds for part in (t, link)][:-1], batches)


def measured_row(result: dict, args) -> dict:
    stage_seconds, link, batches = per_batch(result)
    step = result["pipeline_seconds"] / batches
    return {
        "arch": result["arch"], "components": result["components"], "hosts": args.hosts,
        "samples/s": f"{result['samples_per_second']:.0f}", "range": result["spread"],
        "stage busy s": " / ".join(f"{b:.2f}" for b in result["busy_seconds"]),
        "KiB out per step": f"{result['bytes_out_per_step'] / 2**10:.0f}",
        "KiB in per step": f"{result['bytes_in_per_step'] / 2**10:.0f}",
        "link ms per step": f"{1000 * link:.2f}",
        "transfer %": f"{100 * link / step:.0f}",
        "bubble %": f"{100 * sum(result['idle_fraction']) / len(result['idle_fraction']):.0f}",
        "model samples/s": f"{batches * args.batch_size / with_hops(stage_seconds, link, batches):.0f}",
    }


def model_rows(result: dict, batch_size: int) -> list[dict]:
    stage_seconds, link, batches = per_batch(result)
    work = sum(stage_seconds)
    rows = []
    for hosts in MODEL_HOSTS:
        equal = [work / hosts] * hosts
        rows.append({
            "arch": result["arch"], "components": result["components"], "hosts L": hosts,
            "stage ms": f"{1000 * work / hosts:.2f}", "link ms": f"{1000 * link:.2f}",
            "predicted samples/s": f"{batches * batch_size / with_hops(equal, link, batches):.0f}",
            "without transfer": f"{batches * batch_size / with_hops(equal, 0.0, batches):.0f}",
            "measured samples/s": f"{result['samples_per_second']:.0f}" if hosts == len(stage_seconds) else "",
        })
    return rows


NOTES = (
    "One stage per host; the hosts are Linux network namespaces on one machine, joined by veth pairs on a "
    "bridge, so the bytes really cross a TCP link but every host shares the machine's cores (2 here: one "
    "per stage, and the kernel's and gloo's copying competes with the stages for them). samples/s: epoch 2 "
    "of 2 (training only), the median run over rounds (range: slowest-fastest). KiB out/in per step: what "
    "host 0's eth0 sent/received in epoch 2 per mini-batch, counted by the kernel (headers included): out "
    "is the batches that stage 0 hands on (s, t, labels), in the last stage's loss reports plus the pull "
    "of the other stages' weights and optimizer state at the epoch's end (a sync). link ms per step: after "
    f"training, host 0 streams {LINK_MESSAGES} messages of one step's out bytes to host 1 over gloo; the time per "
    "message. transfer %: link ms per step / the epoch's wall time per step, the share of a step that the "
    "link is busy with its batch (it overlaps compute: each rank sends on a thread of its own). bubble %: "
    "the mean share of the epoch a stage was idle. model samples/s: the schedule model fed with this run's "
    "stage busy times and link time."
)
MODEL_NOTES = (
    "The measured compute per mini-batch W (all stages' busy seconds / batches) cut into L equal stages, "
    "one per host, with the measured link time h between each two: T = sum(t) + (M - 1) max(t) over "
    "t = W/L, h, W/L, ..., W/L (2L - 1 parts: a hop is a part of its own, as sending overlaps compute), M "
    "the batches of an epoch. 'without transfer': the same with h = 0. It assumes every hop carries as "
    "many bytes as the measured one (true for the mlp, whose components are all as wide) and each host's "
    "own cores; once W/L falls below h the link is the slowest part and more hosts add nothing."
)


if __name__ == "__main__":
    print(json.dumps(rank_run(json.loads(sys.argv[1]))))
