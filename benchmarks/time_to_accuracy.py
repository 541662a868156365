"""`al bench time-to-accuracy`: training seconds until validation accuracy first reaches a target, for BP
and AL (sequential, threads pipeline, processes pipeline) side by side, over seeds.

The target of a seed is BP's validation accuracy after N epochs (--reference-epochs) minus 0.5 points,
read from that seed's BP run. Every run trains under the same --max-epochs schedule and stops at the
first epoch end at or above the target. Seconds are training time (the trainer's epoch seconds, which
leave out evaluation), so a pipeline pays for starting its stages. Every run is a fresh process.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from al.trainer import Callback
from benchmarks.macs import component_macs, training_macs, typical_sample
from benchmarks.report import destination, mean_sd, publish
from benchmarks.runs import build_trainer, case_model, run_in_fresh_process, subset_file, table_name

TARGET_MARGIN = 0.005  # half a point below BP's reference accuracy


class StopAt(Callback):
    """Stop at the first epoch end at or above the target accuracy, or after `epochs` epochs."""

    def __init__(self, target: float | None, epochs: int | None):
        self.target, self.epochs = target, epochs

    def on_epoch_end(self, trainer, metrics):
        if (self.target is not None and metrics["val_accuracy"] >= self.target) or metrics["epoch"] == self.epochs:
            trainer.request_stop()


def one_run(spec: dict) -> dict:
    """Train as `spec` says in this process until the target or the last epoch; the curve and the work done."""
    trainer = build_trainer(spec, [StopAt(spec["target"], spec["stop_after_epochs"])])
    trainer.fit()
    seconds, curve = 0.0, []
    for metrics in trainer.history:
        seconds += metrics["seconds"]
        curve.append({"epoch": metrics["epoch"], "seconds": seconds, "val_accuracy": metrics["val_accuracy"]})
    counts = component_macs(trainer.net, typical_sample(trainer.train_x))
    result = {"curve": curve, "train_samples": len(trainer.train_x),
              "train_flops_per_sample": 2 * training_macs(counts, trainer.cfg.method)}
    if trainer.cfg.pipeline != "sequential":
        stats = trainer.runner.stats  # of the last epoch
        result.update(stages=stats["stages"], busy_seconds=stats["busy_seconds"],
                      idle_fraction=stats["idle_fraction"])
    return result


def seconds_to(curve: list[dict], target: float) -> tuple[float, int] | None:
    """(seconds, epochs) at the first epoch end at or above the target, or None."""
    return next(((p["seconds"], p["epoch"]) for p in curve if p["val_accuracy"] >= target), None)


def variants_of(preset: str, variants: dict | None) -> list[tuple[str, dict]]:
    """The variants (name, {"model", "training", "preset"?}) that run with a preset: each, unless it names
    another preset (default: the preset as it is)."""
    return [(name, changes) for name, changes in (variants or {"": {}}).items()
            if changes.get("preset", preset) == preset]


def bench_case(args, data: str, arch: str, depth: int, raw: list[dict]) -> list[dict]:
    cores = args.cores or os.cpu_count() or 1
    stage_devices = ["cpu"] * min(depth, cores)
    # label -> (threads, training, preset, model on top of the case's); the first BP run sets the target
    runs = {}
    for preset in args.bp_presets:
        for variant, changes in variants_of(preset, args.bp_variants):
            for n in sorted({1, cores}):
                label = " ".join(part for part in ("BP", preset, variant) if part) + f", {n} thread(s)"
                runs[label] = (n, {**changes.get("training", {}), "method": "bp"}, preset, changes.get("model", {}))
    modes = {"sequential": (f"sequential, {cores} thread(s)", cores, {}),
             "threads": ("threads", 1, {"pipeline": "threads", "devices": stage_devices}),
             "processes": ("processes", 1, {"pipeline": "processes", "devices": stage_devices})}
    for preset in args.al_presets:
        for variant, changes in variants_of(preset, args.al_variants):
            for mode in args.al_modes:
                name, threads, placement = modes[mode]
                label = " ".join(part for part in ("AL", preset, variant, name) if part)
                runs[label] = (threads, {**changes.get("training", {}), **placement}, preset, changes.get("model", {}))
    measured: dict[str, list[dict]] = {label: [] for label in runs}
    for seed in range(args.seeds):
        target = None
        for label, (threads, training, preset, model_changes) in runs.items():
            # The seed's first run (BP) trains N epochs and sets the target; the others stop at it.
            method = training.get("method", "al")
            spec = {"data": data, "model": {**case_model(arch, depth, args.mlp_width, preset, method),
                                            **model_changes},
                    "threads": threads, "preset": preset,
                    "target": target,
                    "stop_after_epochs": args.reference_epochs if target is None else None,
                    "training": {"batch_size": args.batch_size, "device": "cpu", "seed": seed,
                                 "epochs": args.max_epochs, "lr": args.lr, **training}}
            result = run_in_fresh_process("benchmarks.time_to_accuracy", spec)
            if target is None:
                target = result["curve"][args.reference_epochs - 1]["val_accuracy"] - TARGET_MARGIN
            result.update(target=target, reached=seconds_to(result["curve"], target))
            measured[label].append(result)
            raw.append({"arch": arch, "components": depth, "run": label, "seed": seed, "spec": spec, **result})
            print(f"{arch} L={depth} seed {seed} {label}: target {target:.4f} reached "
                  f"{result['reached']}", file=sys.stderr)
    return table_rows(arch, depth, measured)


def table_rows(arch: str, depth: int, measured: dict[str, list[dict]]) -> list[dict]:
    def seconds(results):
        return [r["reached"][0] for r in results if r["reached"]]

    bp_labels = [label for label in measured if label.startswith("BP")]
    best_bp = min(bp_labels, key=lambda label: statistics.median(seconds(measured[label]) or [float("inf")]))
    bp_seconds = statistics.median(seconds(measured[best_bp]) or [float("nan")])
    rows = []
    for label, results in measured.items():
        reached = seconds(results)
        row = {"case": f"{arch}, {depth} components", "run": label + (" (best BP)" if label == best_bp else ""),
               "reached": f"{len(reached)}/{len(results)}"}
        if reached:
            mean, sd = mean_sd(reached)
            epochs = [r["reached"][1] for r in results if r["reached"]]
            row.update({"seconds to target": f"{mean:.1f} +- {sd:.1f}",
                        "x best BP (median)": f"{statistics.median(reached) / bp_seconds:.2f}",
                        "epochs": "/".join(str(e) for e in epochs)})
        first = results[0]
        flops = first["train_flops_per_sample"]
        trained = sum(r["curve"][-1]["seconds"] for r in results)
        samples = sum(first["train_samples"] * len(r["curve"]) for r in results)
        row.update({"MFLOP / training sample": f"{flops / 1e6:.2f}",
                    "achieved GFLOP/s": f"{flops * samples / trained / 1e9:.2f}",
                    "target (val acc)": f"{statistics.fmean(r['target'] for r in results):.4f}"})
        if "busy_seconds" in first:
            row.update({"stage busy s (last epoch)": " / ".join(f"{b:.2f}" for b in first["busy_seconds"]),
                        "bubble %": f"{100 * statistics.fmean(first['idle_fraction']):.0f}"})
        rows.append(row)
    return rows


def curves_svg(raw: list[dict], arch: str, depth: int, seed: int = 0) -> str:
    """Validation accuracy against training seconds, one line per run of the case (seed 0)."""
    runs = [r for r in raw if r["arch"] == arch and r["components"] == depth and r["seed"] == seed]
    width, height, left, bottom, top = 640, 360, 50, 40, 28
    x_max = max(p["seconds"] for r in runs for p in r["curve"])
    accuracies = [p["val_accuracy"] for r in runs for p in r["curve"]]
    y_min, y_max = min([*accuracies, runs[0]["target"]]) - 0.01, max(accuracies) + 0.005

    def point(p):
        x = left + (width - left - 10) * p["seconds"] / x_max
        y = height - bottom - (height - bottom - top) * (p["val_accuracy"] - y_min) / (y_max - y_min)
        return f"{x:.1f},{y:.1f}"

    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    target_y = float(point({"seconds": 0, "val_accuracy": runs[0]["target"]}).split(",")[1])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="14">{arch}, {depth} components, seed {seed}: validation accuracy against '
             f'training seconds</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - 10}" height="{height - bottom - top}" fill="none" '
             f'stroke="#ccc"/>',
             f'<line x1="{left}" y1="{target_y}" x2="{width - 10}" y2="{target_y}" stroke="grey" '
             f'stroke-dasharray="4"/><text x="{left + 4}" y="{target_y - 4}">target</text>',
             f'<text x="{left}" y="{height - bottom + 14}">0 s</text>',
             f'<text x="{width - 50}" y="{height - bottom + 14}">{x_max:.0f} s</text>',
             f'<text x="2" y="{height - bottom}">{y_min:.2f}</text><text x="2" y="{top + 8}">{y_max:.2f}</text>']
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        points = " ".join(point(p) for p in run["curve"])
        legend_y = height - bottom - 8 - 14 * (len(runs) - 1 - i)
        parts += [f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>',
                  f'<text x="{width - 230}" y="{legend_y}" fill="{colour}">{run["run"]}</text>']
    return "\n".join([*parts, "</svg>"]) + "\n"


def bench_time_to_accuracy(args) -> None:
    rows, raw = [], []
    where = destination(args)
    figures = where.report.parent / "figures"
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_file(args.dataset, args.samples, Path(tmp)))
        for case in args.cases:
            arch, _, depth = case.partition(":")
            rows += bench_case(args, data, arch, int(depth), raw)
            figures.mkdir(parents=True, exist_ok=True)
            (figures / f"time-to-accuracy-{arch}-{depth}.svg").write_text(curves_svg(raw, arch, int(depth)))
            publish_results(args, where, rows, raw)  # after every case: an interrupted run keeps what it measured


def publish_results(args, where, rows, raw) -> None:
    columns = ["case", "run", "reached", "seconds to target", "x best BP (median)", "epochs", "target (val acc)",
               "MFLOP / training sample", "achieved GFLOP/s", "stage busy s (last epoch)", "bubble %"]
    figures = " ".join(f"![{c}](figures/time-to-accuracy-{c.replace(':', '-')}.svg)" for c in args.cases)
    publish(
        where,
        name=table_name("time-to-accuracy", [case.partition(":")[0] for case in args.cases], "cpu"),
        title=f"Time to accuracy: {args.dataset} ({args.samples} samples), batch {args.batch_size}, target = BP's "
        f"validation accuracy after {args.reference_epochs} epochs - 0.5 points, {args.seeds} seeds",
        columns=columns,
        rows=rows,
        notes=(f"The target comes from each seed's run of BP `{args.bp_presets[0]}` on one thread. Every run "
               f"trains under a {args.max_epochs}-epoch schedule and stops at the target. Seconds: training only "
               "(evaluation excluded), mean +- sd over the seeds that reached the target; 'x best BP' compares "
               "medians. MFLOP per training sample: 2 x "
               "3 x the forward MACs of what the method trains (AL: f, b, g, h of every component; BP: the "
               "inference path); achieved GFLOP/s = that x samples trained / training seconds. Stage busy and "
               "bubble: the pipeline's last epoch. Curves (seed 0): " + figures),
        raw={"runs": raw, "settings": {k: v for k, v in vars(args).items() if k != "func"},
             "load_average": open("/proc/loadavg").read().split()[:3]},
    )


if __name__ == "__main__":
    started = time.perf_counter()
    print(json.dumps({**one_run(json.loads(sys.argv[1])), "process_seconds": time.perf_counter() - started}))
