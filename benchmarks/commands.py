"""`al bench ...`, added to the `al` command through the entry-point group `al.commands` (pyproject.toml).

Cheap to import: the benchmarks themselves (torch, the service's clients) load when one runs."""

from __future__ import annotations

import argparse
import json


def add_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--results-dir", default="benchmarks/results",
                        help="where the JSON results go (default benchmarks/results)")
    common.add_argument("--report", default="docs/benchmarks.md",
                        help="the Markdown report whose tables are updated (default docs/benchmarks.md)")
    p = sub.add_parser("bench", help="benchmarks; results go to --results-dir and --report")
    p.set_defaults(func=run_benchmark)
    kinds = p.add_subparsers(dest="bench", required=True)
    for add_parser in (add_accuracy, add_time_to_accuracy, add_early_exit, add_serve, add_pipeline, add_hosts,
                       add_fine_tune):
        add_parser(kinds, common)


def run_benchmark(args) -> None:
    """The benchmark that `al bench KIND` names."""
    from benchmarks import accuracy, early_exit, fine_tune, pipeline, pipeline_hosts, serve, time_to_accuracy

    benchmark = {
        "accuracy": accuracy.bench_accuracy,
        "time-to-accuracy": time_to_accuracy.bench_time_to_accuracy,
        "early-exit": early_exit.bench_early_exit,
        "serve": serve.bench_serve,
        "pipeline": pipeline.bench_pipeline,
        "hosts": pipeline_hosts.bench_hosts,
        "fine-tune": fine_tune.bench_fine_tune,
    }[args.bench]
    benchmark(args)


def add_accuracy(kinds, common) -> None:
    a = kinds.add_parser("accuracy", parents=[common],
                         help="AL and BP side by side: last-epoch test accuracy and time")
    a.add_argument("--dataset", default="fashion-mnist")
    a.add_argument("--arch", default="mlp")
    a.add_argument("--model", type=json.loads, default={},
                   help='model fields on top of --arch, e.g. \'{"max_tokens": 128}\' or \'{"widths": [256, 256]}\'; '
                   "they name the table too")
    a.add_argument("--training", type=json.loads, default={},
                   help='training fields on top of the preset\'s, e.g. \'{"target_warmup": 160}\' (its lr over --lr); '
                   "they name the table too")
    a.add_argument("--samples", type=int, default=None,
                   help="the first N training samples and N/4 test samples (default: all)")
    a.add_argument("--epochs", type=int, default=20)
    a.add_argument("--seeds", type=int, default=3)
    a.add_argument("--batch-size", type=int, default=None)
    a.add_argument("--lr", type=float, default=None, help="learning rate of AL and BP (default: the preset's)")
    a.add_argument("--presets", nargs="+", default=["default"])
    a.add_argument("--methods", nargs="+", default=["al", "bp"], choices=["al", "bp"],
                   help="which to train (default both); one alone names the table too")
    a.add_argument("--device", default="auto")
    a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    a.add_argument("--name", default=None, help="the dataset's name in the table's (default: the name or file stem)")


def add_time_to_accuracy(kinds, common) -> None:
    p = kinds.add_parser("time-to-accuracy", parents=[common],
                         help="seconds until validation accuracy reaches BP's after N epochs - 0.5 points")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--samples", type=int, default=12000, help="training samples (of which 10 %% validate)")
    p.add_argument("--cases", nargs="+", default=["mlp:2", "mlp:4", "cnn:2", "cnn:4"], help="ARCH:COMPONENTS")
    p.add_argument("--mlp-width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the presets')")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reference-epochs", type=int, default=3, help="N: BP's accuracy after N epochs sets the target")
    p.add_argument("--max-epochs", type=int, default=10, help="the schedule's length, and the most any run trains")
    p.add_argument("--al-presets", nargs="+", default=["default"], help="AL runs with each of these presets")
    p.add_argument("--al-variants", type=json.loads, default=None,
                   help='AL runs each preset with each of these changes, e.g. \'{"fan-out": {"model": {"init": '
                        '"he_fan_out"}, "training": {"target_warmup": 100}}}\' (default: the preset as it is); a '
                        'change with "preset": P runs with preset P only')
    p.add_argument("--al-modes", nargs="+", choices=("sequential", "threads", "processes"),
                   default=["sequential", "threads", "processes"], help="how AL runs train")
    p.add_argument("--cores", type=int, default=None,
                   help="the most threads a run uses (default: every core; fewer where others share the machine)")
    p.add_argument("--bp-presets", nargs="+", default=["default"],
                   help="BP runs with each; the first preset's first variant, on one thread, sets the target; the "
                        "fastest is 'best BP'")
    p.add_argument("--bp-variants", type=json.loads, default=None,
                   help="BP runs each preset with each of these changes, as --al-variants")


def add_early_exit(kinds, common) -> None:
    p = kinds.add_parser("early-exit", parents=[common],
                         help="confidence exits: accuracy against MACs per row and latency, by threshold and depth")
    p.add_argument("--model", default=None, help="a model directory (default: train one here)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--arch", default="cnn")
    p.add_argument("--widths", type=lambda text: [int(w) for w in text.split(",")], default=[32, 64, 128, 256],
                   help="one per component (default 32,64,128,256: 4 components)")
    p.add_argument("--preset", default="default")
    p.add_argument("--samples", type=int, default=60000, help="training samples when training here")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999])
    p.add_argument("--latency-rows", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1, as al serve)")


def add_serve(kinds, common) -> None:
    p = kinds.add_parser("serve", parents=[common],
                         help="HTTP predict latency, batching off and on, next to the bare forward; "
                              "submit-to-running time")
    p.add_argument("--requests", type=int, default=1000, help="timed requests per case (default 1000)")
    p.add_argument("--jobs", type=int, default=5, help="jobs submitted one at a time (default 5)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of each bench job (default 1)")
    p.add_argument("--redis-url", default=None, help="use this Redis as the broker (default: the embedded one)")
    p.add_argument("--inference-threads", type=int, default=1, help="torch threads of the server and the bare forward")


def add_pipeline(kinds, common) -> None:
    p = kinds.add_parser("pipeline", parents=[common],
                         help="pipelined AL (threads, processes) against sequential AL and BP")
    add_case_arguments(p)
    p.add_argument("--devices", type=lambda text: text.split(","), default=None,
                   help="stage devices, e.g. cuda:0,cuda:1 (default: one CPU stage per core); runs without a "
                   "pipeline use the first")


def add_hosts(kinds, common) -> None:
    p = kinds.add_parser("hosts", parents=[common],
                         help="pipelined AL with one CPU stage per host, the hosts network namespaces on this "
                         "machine (needs root)")
    add_case_arguments(p)
    p.add_argument("--hosts", type=int, default=2, help="hosts, one stage each (default 2)")


def add_fine_tune(kinds, common) -> None:
    p = kinds.add_parser("fine-tune", parents=[common],
                         help="a model trained on half the classes' rows, adapted with the other half (or every "
                         "row) by training its top component only against all: time and accuracy")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--samples", type=int, default=None, help="the first N training rows (default: all)")
    p.add_argument("--arch", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--depth", type=int, default=3, help="components (default 3)")
    p.add_argument("--mlp-width", type=int, default=512)
    p.add_argument("--preset", default="lean")
    p.add_argument("--base-epochs", type=int, default=5, help="epochs of the base model (default 5)")
    p.add_argument("--adapt-epochs", type=int, default=3, help="epochs of each adaptation (default 3)")
    p.add_argument("--adapt-rows", nargs="+", choices=("new", "all"), default=["new", "all"],
                   help="adapt with the rows of the other half of the classes (new), or with every row (all)")
    p.add_argument("--adapt-components", nargs="+", default=["top", "1", "all"],
                   help="the components each adaptation trains: top, all, or a list numbered from 1 (top: the last), "
                   "e.g. 1,2 (default: top 1 all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the preset's)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")


def add_case_arguments(p) -> None:
    """The data, models and repeats of a pipeline benchmark (`al bench pipeline`, `al bench hosts`)."""
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--samples", type=int, default=8192, help="training samples (an epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--depths", nargs="+", type=int, default=[2, 4])
    p.add_argument("--mlp-width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the median is reported")
