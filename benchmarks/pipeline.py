"""`al bench pipeline`: what pipelined AL buys over sequential AL and BP, measured, and a model of it.

Every run is a fresh Python process (`python -m benchmarks.pipeline RUN_JSON`), so that its peak
memory is its own and no thread setting leaks between runs. A run trains two epochs and reports
the second: the first pays for spawning stages, profiling and first-call allocations.

The schedule model (spec section 4): with per-batch stage times t_1..t_L, a window of M
mini-batches between syncs takes sum(t) to fill the pipeline and then max(t) per batch,
    T = sum(t) + (M - 1) * max(t),
and on C cores no faster than the work allows, T >= M * sum(t) / C. Measured stage times go in;
the gap between prediction and measurement is what the model leaves out (hand-off, Python, GIL).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import destination, publish
from benchmarks.runs import build_trainer, case_model, run_in_fresh_process, subset_file, table_name

MODEL_STAGES = (1, 2, 4, 8, 16)


def predicted_seconds(stage_seconds: list[float], batches: int, cores: int | None = None) -> float:
    """Time for `batches` mini-batches through stages with these per-batch times (see the module docstring)."""
    pipelined = sum(stage_seconds) + (batches - 1) * max(stage_seconds)
    return pipelined if cores is None else max(pipelined, batches * sum(stage_seconds) / cores)


def one_run(spec: dict, callbacks=()) -> dict:
    """Train as `spec` says in this process; throughput of the second epoch, stage times, peak memory.
    A rank > 0 (started with torchrun's RANK and WORLD_SIZE) trains its stage for rank 0 and says only that."""
    from al.pipeline import ProcessesRunner
    from al.pipeline.launch import peak_rss_bytes

    trainer = build_trainer(spec, callbacks, epochs=2, val_fraction=0.05)
    if isinstance(trainer.runner, ProcessesRunner) and trainer.runner.is_worker:
        return trainer.runner.serve(trainer.work)
    trainer.fit()
    seconds = trainer.history[-1]["seconds"]
    result = {"samples_per_second": len(trainer.train_x) / seconds, "seconds": seconds,
              "batches": trainer.steps_per_epoch, "peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():  # this process's GPUs only: a processes run's workers are not counted
        result["peak_cuda_bytes"] = sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
    if trainer.cfg.pipeline != "sequential":
        stats = trainer.runner.stats
        result.update(stages=stats["stages"], busy_seconds=stats["busy_seconds"],
                      idle_fraction=stats["idle_fraction"], pipeline_seconds=stats["wall_seconds"],
                      peak_rss_bytes=sum(stats["peak_rss_bytes"]))  # every stage process together
    return result


def bench_pipeline(args) -> None:
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_file(args.dataset, args.samples, Path(tmp)))
        for arch in args.archs:
            for depth in args.depths:
                rows += bench_model(args, data, arch, depth, raw)
    model_rows = schedule_model_rows(raw, args.batch_size)
    kind = "cuda" if args.devices and args.devices[0].startswith("cuda") else "cpu"  # CPU and GPU tables side by side
    publish(
        destination(args),
        name=table_name("pipeline", args.archs, kind),
        title=f"Pipelined AL: {args.dataset} ({args.samples} samples), batch {args.batch_size}, epoch 2 of 2, "
        f"median of {args.repeats}",
        columns=["arch", "components", "run", "stages", "samples/s", "range", "x AL 1 thread", "x best sequential AL",
                 "parallel efficiency", "stage busy s", "bubble %", "model samples/s", "peak MiB", "peak GPU MiB"],
        rows=rows,
        notes=NOTES.format(**summary(rows)),
        raw={"runs": raw, "schedule_model": model_rows, "settings": vars_of(args),
             "load_average": open("/proc/loadavg").read().split()[:3]},
    )
    publish(
        destination(args),
        name=table_name("pipeline-model", args.archs, kind),
        title="Pipelined AL: the schedule model, from measured stage times, on L devices",
        columns=["arch", "components", "stages L", "batches per sync M", "predicted samples/s",
                 "predicted x sequential", "measured samples/s", "measured x sequential"],
        rows=model_rows,
        notes=MODEL_NOTES,
        raw={"settings": vars_of(args)},
    )


def bench_model(args, data: str, arch: str, depth: int, raw: list[dict]) -> list[dict]:
    """BP, sequential AL on 1 and all threads, and AL threads/processes for one model; its table rows."""
    cores = os.cpu_count() or 1
    device = args.devices[0] if args.devices else "cpu"
    model = case_model(arch, depth, args.mlp_width)

    def measure(label, threads, **training):
        spec = {"data": data, "model": model, "threads": threads,
                "training": {"batch_size": args.batch_size, "device": device, "schedule": "none", **training}}
        result = run_in_fresh_process("benchmarks.pipeline", spec)
        raw.append({"arch": arch, "components": depth, "run": label, "spec": spec, **result})
        print(f"{arch} L={depth} {label}: {result['samples_per_second']:.0f} samples/s", file=sys.stderr)
        return result

    thread_counts = sorted({1, cores})
    stage_devices = [args.devices] if args.devices else [["cpu"] * n for n in sorted({min(depth, cores), depth})]
    configurations = {("bp", n): (f"BP {n} thread(s)", n, {"method": "bp"}) for n in thread_counts}
    configurations |= {("al", n): (f"AL sequential, {n} thread(s)", n, {}) for n in thread_counts}
    configurations |= {(mode, len(devices)): (f"AL {mode}", 1, {"pipeline": mode, "devices": devices})
                       for devices in stage_devices for mode in ("threads", "processes")}
    # Rounds over all configurations, so that a change in the machine's load hits all of them alike.
    results = {key: [] for key in configurations}
    for _ in range(args.repeats):
        for key, (label, threads, training) in configurations.items():
            results[key].append(measure(label, threads, **training))
    median = {key: median_run(measured) for key, measured in results.items()}
    bp = max((median["bp", n] for n in thread_counts), key=lambda r: r["samples_per_second"])
    al_one, al_all = median["al", 1], median["al", cores]
    runs = [("BP, best thread count", bp, None), ("AL sequential, 1 thread", al_one, None),
            (f"AL sequential, {cores} threads", al_all, None)]
    runs += [(configurations[key][0], median[key], key[1]) for key in configurations if key[0] not in ("bp", "al")]
    best_sequential = max(al_one["samples_per_second"], al_all["samples_per_second"])
    # what can run at once: the cores, or the distinct GPUs
    units = len(set(args.devices)) if device.startswith("cuda") else cores
    return [table_row(arch, depth, label, stages, result, al_one, best_sequential, units, args.batch_size)
            for label, result, stages in runs]


def median_run(results: list[dict]) -> dict:
    """The run with the median throughput (its own stage times and memory), and the spread of all."""
    ordered = sorted(results, key=lambda r: r["samples_per_second"])
    spread = f"{ordered[0]['samples_per_second']:.0f}-{ordered[-1]['samples_per_second']:.0f}"
    return {**ordered[(len(ordered) - 1) // 2], "spread": spread}


def vars_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def table_row(arch, depth, label, stages, result, al_one, best_sequential, units, batch_size) -> dict:
    speedup = result["samples_per_second"] / al_one["samples_per_second"]
    row = {
        "arch": arch,
        "components": depth,
        "run": label,
        "stages": stages or "",
        "samples/s": f"{result['samples_per_second']:.0f}",
        "range": result["spread"],
        "x AL 1 thread": f"{speedup:.2f}",
        "x best sequential AL": f"{result['samples_per_second'] / best_sequential:.2f}",
        "peak MiB": f"{result['peak_rss_bytes'] / 2**20:.0f}",
        "peak GPU MiB": f"{result['peak_cuda_bytes'] / 2**20:.0f}" if "peak_cuda_bytes" in result else "",
        "peak_ratio": result["peak_rss_bytes"] / al_one["peak_rss_bytes"],
    }
    if stages:
        batches = result["batches"]
        per_batch = [b / batches for b in result["busy_seconds"]]
        predicted = predicted_seconds(per_batch, batches, units)
        row.update({
            "parallel efficiency": f"{speedup / min(stages, units):.2f}",
            "stage busy s": " / ".join(f"{b:.2f}" for b in result["busy_seconds"]),
            "bubble %": f"{100 * sum(result['idle_fraction']) / len(result['idle_fraction']):.0f}",
            "model samples/s": f"{batches * batch_size / predicted:.0f}",
        })
    return row


def schedule_model_rows(raw: list[dict], batch_size: int) -> list[dict]:
    """Predicted throughput of L stages on L devices for each model, from its measured times.

    Per mini-batch: W, the 1-thread sequential time, and h, what the 2-stage threads run's stages
    spent beyond W together (hand-off, contention). L stages take W / L + h / 2 each; the
    schedule model turns that into a time per sync window. The measured column holds the
    threads runs (on this machine's cores, so 4 stages on 2 cores cannot match the prediction).
    """
    rows = []
    for arch, depth in dict.fromkeys((r["arch"], r["components"]) for r in raw):
        runs = [r for r in raw if r["arch"] == arch and r["components"] == depth]
        one = median_run([r for r in runs if r["run"] == "AL sequential, 1 thread(s)"])
        by_stages: dict[int, list[dict]] = {}
        for r in runs:
            if r["run"] == "AL threads":
                by_stages.setdefault(len(r["stages"]), []).append(r)
        measured = {n: median_run(rs) for n, rs in by_stages.items()}
        batches = one["batches"]
        work = one["seconds"] / batches
        overhead = max(0.0, sum(measured[2]["busy_seconds"]) / batches - work) if 2 in measured else 0.0
        for stages in MODEL_STAGES:
            stage_seconds = [work / stages + (overhead / 2 if stages > 1 else 0.0)] * stages
            predicted = batches * batch_size / predicted_seconds(stage_seconds, batches)
            row = {"arch": arch, "components": depth, "stages L": stages, "batches per sync M": batches,
                   "predicted samples/s": f"{predicted:.0f}",
                   "predicted x sequential": f"{predicted / one['samples_per_second']:.2f}"}
            if stages in measured:
                throughput = measured[stages]["samples_per_second"]
                row["measured samples/s"] = f"{throughput:.0f}"
                row["measured x sequential"] = f"{throughput / one['samples_per_second']:.2f}"
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """The targets' figures, for the first architecture (mlp by default) with 2 components."""
    arch = rows[0]["arch"]

    def find(run, depth=2):
        return next(r for r in rows if r["arch"] == arch and r["components"] == depth and r["run"] == run)

    threads, processes = find("AL threads"), find("AL processes")
    return {
        "arch": arch,
        "threads_vs_one": threads["x AL 1 thread"],
        "threads_vs_best": threads["x best sequential AL"],
        "processes_vs_threads": f"{float(processes['samples/s']) / float(threads['samples/s']):.2f}",
        "threads_memory": f"{threads['peak_ratio']:.2f}",
        "processes_memory": f"{processes['peak_ratio']:.2f}",
    }


NOTES = (
    "What the numbers mean. samples/s is the second of two epochs (training only, evaluation excluded), "
    "the median over rounds of all runs (range: slowest-fastest). "
    "'x AL 1 thread' is the speed-up over sequential AL on one thread; 'x best sequential AL' over the faster "
    "of 1 thread and all cores; parallel efficiency = speed-up / min(stages, cores). Stage busy s is the time "
    "each stage spent training in the epoch; bubble % the mean share of the epoch a stage was idle (filling, "
    "draining, waiting on a slower neighbour or on the GIL). 'model samples/s' is the schedule model fed with "
    "the measured stage times of that run. Peak MiB is the peak RSS of the run's process(es), all stage "
    "processes summed. Targets for 2 stages, {arch}: threads {threads_vs_one}x one-thread sequential (target "
    ">= 1.7) and {threads_vs_best}x the best sequential (>= 1.05); processes/threads = {processes_vs_threads} "
    "(within 15 %); peak memory {threads_memory}x sequential for threads and {processes_memory}x for processes "
    "(<= 1.5)."
)
MODEL_NOTES = (
    "Predicted: a sync window of M mini-batches (one epoch here) takes T = sum(t) + (M - 1) max(t) on L "
    "devices, one stage each; t = W / L + h / 2 per stage, with W the measured one-thread sequential time "
    "per mini-batch and h what the two stages of the measured 2-stage threads run spent beyond W (hand-off, "
    "contention). Without h the speed-up is the ceiling L M / (M + L - 1). Measured: the threads runs, on "
    "this machine's cores, so 4 stages on 2 cores are bounded by 2x whatever the model says for 4 devices."
)


if __name__ == "__main__":
    started = time.perf_counter()
    print(json.dumps({**one_run(json.loads(sys.argv[1])), "process_seconds": time.perf_counter() - started}))
