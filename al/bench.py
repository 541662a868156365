"""Benchmarks (`al bench ...`): measured figures written as JSON under benchmarks/results/
and as tables in docs/benchmarks.md, each with the machine and the exact command."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS_DIR = Path("benchmarks/results")
REPORT = Path("docs/benchmarks.md")


def machine() -> str:
    """The machine in words: CPU, cores, accelerator, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def publish(name: str, title: str, columns: list[str], rows: list[dict], notes: str, raw: dict) -> Path:
    """Write results/<name>.json and its table in the report; the JSON holds the command and machine."""
    record = {
        "name": name,
        "title": title,
        "command": " ".join(shlex.quote(a) for a in ["al", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "columns": columns,
        "rows": rows,
        "notes": notes,
        **raw,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    update_report(record)
    return path


def update_report(record: dict) -> None:
    """Put the record's table between the markers <!-- bench:NAME --> in docs/benchmarks.md."""
    name, columns = record["name"], record["columns"]
    table = [
        f"### {record['title']}",
        "",
        f"Machine: {record['machine']}. Date: {record['date']}.",
        "",
        f"Command: `{record['command']}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    table += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in record["rows"]]
    if record["notes"]:
        table += ["", record["notes"]]
    block = f"<!-- bench:{name} -->\n" + "\n".join(table) + f"\n<!-- /bench:{name} -->"
    report = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if pattern.search(report):
        report = pattern.sub(lambda _: block, report)
    else:
        report = report.rstrip() + "\n\n" + block + "\n"
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report)


# --- accuracy: AL next to BP ---------------------------------------------------------


def bench_accuracy(args) -> None:
    from al.data import load_dataset
    from al.run import train

    data = load_dataset(args.dataset)
    runs: dict[str, list[dict]] = {}
    for preset in args.presets:
        for method in ("al", "bp"):
            key = f"{method}/{preset}"
            runs[key] = []
            for seed in range(args.seeds):
                training = {"method": method, "epochs": args.epochs, "seed": seed, "device": args.device,
                            "batch_size": args.batch_size}
                with tempfile.TemporaryDirectory() as out:
                    result = train(data, out, preset, {"arch": args.arch}, training)
                runs[key].append(result)
                print(f"{key} seed {seed}: test_accuracy {result['test_accuracy']:.4f} "
                      f"({result['train_seconds']:.1f}s)", file=sys.stderr)
                # After every run, so that an interrupted benchmark still publishes what it measured.
                publish_accuracy(args.dataset, args.arch, args.epochs, runs)


def publish_accuracy(dataset: str, arch: str, epochs: int, runs: dict[str, list[dict]], **record) -> None:
    """The table of `runs` (method/preset -> per-seed results with test_accuracy, train_seconds, epochs)."""
    rows = []
    for key, results in runs.items():
        if not results:
            continue
        acc_mean, acc_sd = mean_sd([100 * r["test_accuracy"] for r in results])
        sec_mean, sec_sd = mean_sd([r["train_seconds"] / r["epochs"] for r in results])
        rows.append({
            "method / preset": key,
            "test accuracy % (last epoch)": f"{acc_mean:.2f} +- {acc_sd:.2f}",
            "seconds / epoch": f"{sec_mean:.2f} +- {sec_sd:.2f}",
            "runs": len(results),
        })
    publish(
        name=f"accuracy-{dataset}-{arch}",
        title=f"Accuracy: AL vs BP, {dataset}, {arch}, {epochs} epochs",
        columns=["method / preset", "test accuracy % (last epoch)", "seconds / epoch", "runs"],
        rows=rows,
        notes="BP trains the same inference topology (f_1..f_L -> b_L -> h_L..h_1) with cross-entropy. "
        "Mean +- sample standard deviation over seeds 0..runs-1; test accuracy of the last epoch.",
        raw={"runs": runs, **record},
    )


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks; results go to benchmarks/results and docs/benchmarks.md")
    kinds = p.add_subparsers(dest="bench", required=True)
    a = kinds.add_parser("accuracy", help="AL and BP side by side: last-epoch test accuracy and time")
    a.add_argument("--dataset", default="fashion-mnist")
    a.add_argument("--arch", default="mlp")
    a.add_argument("--epochs", type=int, default=20)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--presets", nargs="+", default=["default"])
    a.add_argument("--device", default="auto")
    a.set_defaults(func=bench_accuracy)
    from al import bench_pipeline, bench_serve

    bench_serve.add_parser(kinds)
    bench_pipeline.add_parser(kinds)
