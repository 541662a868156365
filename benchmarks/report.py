"""Where benchmarks write: results/<name>.json with the command and machine, and the same figures as a
table between markers in a Markdown report. Both places are options of `al bench` (--results-dir, --report)."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Destination:
    results_dir: Path  # one JSON file per benchmark
    report: Path  # the Markdown file that holds every benchmark's table


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


def publish(where: Destination, name: str, title: str, columns: list[str], rows: list[dict], notes: str,
            raw: dict) -> Path:
    """Write <results_dir>/<name>.json and its table in the report; the JSON holds the command and machine."""
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
    where.results_dir.mkdir(parents=True, exist_ok=True)
    path = where.results_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    update_report(where.report, record)
    return path


def update_report(report_path: Path, record: dict) -> None:
    """Put the record's table between the markers <!-- bench:NAME --> in the report."""
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
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    # Benchmarks that run side by side publish into one report: each reads and rewrites it under a lock, so that
    # none loses another's table.
    with open(report_path.with_name(report_path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = report_path.read_text() if report_path.exists() else "# Benchmarks\n"
        if pattern.search(report):
            report = pattern.sub(lambda _: block, report)
        else:
            report = report.rstrip() + "\n\n" + block + "\n"
        report_path.write_text(report)


def destination(args) -> Destination:
    return Destination(Path(args.results_dir), Path(args.report))
