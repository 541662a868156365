"""Benchmarks (`al bench ...`): measured figures written as JSON (--results-dir, default benchmarks/results)
and as tables in a Markdown report (--report, default docs/benchmarks.md), each with the machine and the
exact command. One module per benchmark; report.py is what they share."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from al.bench import accuracy, early_exit, pipeline, pipeline_hosts, serve, time_to_accuracy

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results-dir", default="benchmarks/results",
                        help="where the JSON results go (default benchmarks/results)")
    common.add_argument("--report", default="docs/benchmarks.md",
                        help="the Markdown report whose tables are updated (default docs/benchmarks.md)")
    p = sub.add_parser("bench", help="benchmarks; results go to --results-dir and --report")
    kinds = p.add_subparsers(dest="bench", required=True)
    for module in (accuracy, time_to_accuracy, early_exit, serve, pipeline, pipeline_hosts):
        module.add_parser(kinds, common)
