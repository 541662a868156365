"""`al bench early-exit`: accuracy against mean MACs per row and against latency, for each fixed depth
and for confidence exits over thresholds, on one trained model (trained here unless --model names one)."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.macs import component_macs, early_exit_macs, path_macs
from benchmarks.report import destination, publish

CHUNK = 1024


def evaluate(model, x: np.ndarray, y: np.ndarray, depth: int | None, exit_confidence: float | None):
    """(accuracy, depths used, rows per second) over the whole set in chunks."""
    correct, depths = 0, []
    started = time.perf_counter()
    for i in range(0, len(x), CHUNK):
        classes, _, used = model.predict(model.request(x[i : i + CHUNK], depth, exit_confidence))
        correct += sum(str(c) == str(model.classes[t]) for c, t in zip(classes, y[i : i + CHUNK]))
        depths += used
    return correct / len(x), depths, len(x) / (time.perf_counter() - started)


def one_row_ms(model, x: np.ndarray, depth: int | None, exit_confidence: float | None) -> float:
    """Median latency of single-row predicts (a request of one row, as a served client sends)."""
    seconds = []
    for row in x:
        started = time.perf_counter()
        model.predict(model.request(row[None], depth, exit_confidence))
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def bench_early_exit(args) -> None:
    from al.data import load_dataset

    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    model = trained_model(args, data)
    counts = component_macs(model.net, torch.zeros(1, *model.input_shape))
    depth = model.depth
    full_macs = path_macs(counts, depth)
    latency_rows = data.test_x[: args.latency_rows]
    measured = measure_cases(model, data, counts, latency_rows, args.thresholds)
    full_accuracy = measured[depth - 1]["accuracy"]
    rows = table_rows(measured, full_accuracy, full_macs)
    publish(
        destination(args),
        name=f"early-exit-{data.name}-{model.config['model']['arch']}",
        title=f"Early exit: {data.name}, {model.config['model']['arch']} with {depth} components, "
        f"accuracy against MACs and latency",
        columns=list(rows[0]),
        rows=rows,
        notes=(
            f"A row exits at the first depth whose top probability reaches the threshold; depth k's path is "
            f"f_1..f_k -> b_k -> h_k..h_1, and an exiting row has paid for every encoder once and for the bridge and "
            f"decoders of each depth it tried. MACs count Linear and Conv2d layers (benchmarks/macs.py). Test set "
            f"of {len(data.test_x)} rows; latency over the first {len(latency_rows)} test rows one at a time, "
            f"{args.threads} torch thread(s). Result: {verdict(measured, full_accuracy, full_macs)}."
        ),
        raw={"cases": measured, "full_path_macs": full_macs, "component_macs": [vars(c) for c in counts],
             "model_config": model.config, "settings": {k: v for k, v in vars(args).items() if k != "func"}},
    )


def trained_model(args, data):
    """The model of --model, or one trained here on the first --samples training samples."""
    from al.checkpoint import load_model
    from al.config import make_config
    from al.data import Dataset
    from al.run import train

    if args.model is not None:
        return load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        subset = Dataset(data.train_x[: args.samples], data.train_y[: args.samples], data.test_x, data.test_y,
                         data.classes, data.name)
        model_spec = {"arch": args.arch, "widths": args.widths}
        training = {"epochs": args.epochs, "batch_size": args.batch_size, "device": "cpu", "seed": 0}
        result = train(subset, tmp, make_config(args.preset, model_spec, training))
        print(f"trained: test accuracy {result['test_accuracy']:.4f}", file=sys.stderr)
        return load_model(tmp)


def measure_cases(model, data, counts, latency_rows: np.ndarray, thresholds: list[float]) -> list[dict]:
    """Accuracy, mean MACs per row, throughput and one-row latency at each fixed depth and each threshold."""
    depth = model.depth
    cases = [(f"depth {k}", k, None) for k in range(1, depth + 1)]
    cases += [(f"exit at confidence {c:g}", None, c) for c in thresholds]
    measured = []
    for label, k, confidence in cases:
        accuracy, depths, rows_per_second = evaluate(model, data.test_x, data.test_y, k, confidence)
        macs = (statistics.fmean(early_exit_macs(counts, d) for d in depths) if confidence is not None
                else path_macs(counts, k))
        measured.append({
            "label": label, "depth": k, "exit_confidence": confidence, "accuracy": accuracy, "mean_macs": macs,
            "depth_histogram": [depths.count(d) for d in range(1, depth + 1)],
            "rows_per_second": rows_per_second, "one_row_ms": one_row_ms(model, latency_rows, k, confidence),
        })
        print(f"{label}: accuracy {accuracy:.4f}, {macs / 1e6:.2f} MMAC/row", file=sys.stderr)
    return measured


def table_rows(measured: list[dict], full_accuracy: float, full_macs: float) -> list[dict]:
    return [{
        "inference": m["label"],
        "test accuracy %": f"{100 * m['accuracy']:.2f}",
        "vs full (points)": f"{100 * (m['accuracy'] - full_accuracy):+.2f}",
        "MMAC / row": f"{m['mean_macs'] / 1e6:.3f}",
        "MACs vs full": f"{m['mean_macs'] / full_macs:.2f}",
        "rows per depth": " / ".join(str(n) for n in m["depth_histogram"]),
        "rows/s (batches of 1024)": f"{m['rows_per_second']:.0f}",
        "1-row p50 ms": f"{m['one_row_ms']:.3f}",
    } for m in measured]


def verdict(measured: list[dict], full_accuracy: float, full_macs: float) -> str:
    """The cheapest confidence exit within 0.3 points of the full path's accuracy, in words."""
    within = [m for m in measured if m["exit_confidence"] is not None and full_accuracy - m["accuracy"] <= 0.003]
    best = min(within, key=lambda m: m["mean_macs"], default=None)
    return ("no threshold keeps accuracy within 0.3 points of the full path" if best is None else
            f"the cheapest exit within 0.3 points of the full path is {best['label']}: "
            f"{100 * (1 - best['mean_macs'] / full_macs):.0f} % fewer MACs per row than the full path "
            f"(target >= 30 %), accuracy {100 * (best['accuracy'] - full_accuracy):+.2f} points")
