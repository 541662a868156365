"""Issue 22's search: an Optuna study with the `time_to_accuracy` objective over the levers of one
`al bench time-to-accuracy` case (the same model, data subset, batch, schedule and target), AL on the threads
pipeline from the `lean` preset. The target is BP's: BP `lean` on all cores trains the case for
--reference-epochs of the --max-epochs schedule (seed 0), and its validation accuracy then, minus 0.5 points,
is what every trial must reach; BP's own seconds to that target are recorded beside the trials.

    .venv/bin/python benchmarks/study-time-to-accuracy.py --case cnn:2 --trials 24
        # writes benchmarks/results/study-time-to-accuracy-cnn-2.json and prints a summary

The winner goes on to `al bench time-to-accuracy --al-variants` for 3 seeds: one seed's trial is a search,
not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from al.study import NOT_REACHED, Goal, run_local
from al.trainer import Callback
from benchmarks.runs import case_model, run_in_fresh_process, subset_file
from benchmarks.time_to_accuracy import TARGET_MARGIN, curves_svg, seconds_to

# The levers of issue 22 that apply to the case's network (conv-only ones are dropped for the mlp).
SPACE = {
    "training.lr": {"type": "float", "low": 5e-4, "high": 1e-2, "log": True},
    "training.target_lr_factor": {"type": "float", "low": 0.5, "high": 8, "log": True},
    "training.bridge_lr_factor": {"type": "float", "low": 0.5, "high": 4, "log": True},
    "training.target_warmup": {"type": "int", "low": 0, "high": 200},
    "model.target_width": {"type": "categorical", "choices": [64, 128, 256]},
    "model.bridge_depth": {"type": "int", "low": 1, "high": 2},
    "model.bridge_activation": {"type": "categorical", "choices": ["tanh", "elu"]},
    "model.encoder_activation": {"type": "categorical", "choices": ["relu", "elu"]},
    "model.h1_loss": {"type": "categorical", "choices": ["mse", "ce"]},
    "model.init": {"type": "categorical", "choices": ["he_normal", "he_fan_out", "orthogonal"]},
    "model.bridge_convs": {"type": "int", "low": 0, "high": 1},
    "model.bridge_pool": {"type": "categorical", "choices": [2, 4]},
}
CONV_ONLY = ("model.bridge_convs", "model.bridge_pool")
AL_ONLY = ("training.target_lr_factor", "training.bridge_lr_factor", "training.target_warmup")
RESULTS = Path(__file__).parent / "results"
FIGURES = Path(__file__).parent.parent / "docs" / "figures"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class TrialLog(Callback):
    """Logs each trial and keeps its curve: validation accuracy against train seconds at each epoch end."""

    def __init__(self, number: int, curves: dict[int, list[dict]]):
        self.number, self.curves = number, curves

    def on_train_end(self, trainer, result):
        seconds = 0.0
        self.curves[self.number] = []
        for metrics in trainer.history:
            seconds += metrics["seconds"]
            self.curves[self.number].append({"epoch": metrics["epoch"], "seconds": round(seconds, 3),
                                             "val_accuracy": metrics["val_accuracy"]})
        log(f"trial {self.number}: {result['status']} after {result['epochs']} epochs, val "
            f"{result.get('val_accuracy'):.4f}, {result['train_seconds']:.1f} s, to target "
            f"{result.get('seconds_to_target')}")


def pareto_front(curves: dict[int, list[dict]]) -> list[dict]:
    """The epoch ends of all trials that no other beats in both validation accuracy and train seconds."""
    points = [{"trial": n, **p} for n, curve in curves.items() for p in curve]

    def beaten(p):
        return any(q["val_accuracy"] >= p["val_accuracy"] and q["seconds"] <= p["seconds"]
                   and (q["val_accuracy"], q["seconds"]) != (p["val_accuracy"], p["seconds"]) for q in points)

    return sorted((p for p in points if not beaten(p)), key=lambda p: p["seconds"])


def front_figure(study: dict, arch: str, depth: int) -> str:
    """The curves of the trials with a point on the Pareto front, next to BP `lean`'s, as an SVG."""
    on_front = sorted({p["trial"] for p in study["pareto_epochs"]})
    runs = [{"run": f"BP lean, {study['bp_lean']['threads']} threads", "curve": study["bp_lean"]["curve"]},
            *({"run": f"trial {n}", "curve": study["curves"][n]} for n in on_front)]
    return curves_svg([{"arch": arch, "components": depth, "seed": 0, "target": study["target"], **run}
                       for run in runs], arch, depth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="cnn:2", help="arch:components, as al bench time-to-accuracy names it")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--reference-epochs", type=int, default=3)
    parser.add_argument("--mlp-width", type=int, default=512)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--method", choices=("al", "bp"), default="al",
                        help="bp: search BP's levers (on all cores) against the same target, to give BP its best")
    args = parser.parse_args()
    if args.reference_epochs > args.max_epochs:
        parser.error(f"--reference-epochs ({args.reference_epochs}) must be at most --max-epochs ({args.max_epochs})")
    arch, _, depth = args.case.partition(":")
    cores = os.cpu_count() or 1
    model = case_model(arch, int(depth), args.mlp_width)
    training = {"batch_size": args.batch_size, "device": "cpu", "seed": 0, "epochs": args.max_epochs}
    space = {path: param for path, param in SPACE.items()
             if (arch == "cnn" or path not in CONV_ONLY) and (args.method == "al" or path not in AL_ONLY)}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_file(args.dataset, args.samples, Path(tmp)))
        bp = run_in_fresh_process("benchmarks.time_to_accuracy", {
            "data": data, "model": model, "threads": cores, "preset": "lean", "target": None,
            "stop_after_epochs": args.reference_epochs, "training": {**training, "method": "bp"}})
        target = round(bp["curve"][args.reference_epochs - 1]["val_accuracy"] - TARGET_MARGIN, 4)
        bp_reached = seconds_to(bp["curve"], target)
        log(f"BP lean, {cores} threads: target {target}, reached at {bp_reached}")
        placement = ({"pipeline": "threads", "devices": ["cpu"] * min(int(depth), cores)} if args.method == "al"
                     else {"method": "bp"})
        base = {"model": model, "preset": "lean", "training": {**training, **placement}}
        curves: dict[int, list[dict]] = {}
        study = run_local(data, base, space, args.trials, Path(tmp) / "study", seed=0,
                          goal=Goal("time_to_accuracy", target), callbacks=lambda n: [TrialLog(n, curves)])
        study["best"].pop("model")  # a temporary directory
    name = f"study-time-to-accuracy-{arch}-{depth}{'-bp' if args.method == 'bp' else ''}"
    out = RESULTS / f"{name}.json"
    result = {
        "command": shlex.join([".venv/bin/python", "benchmarks/study-time-to-accuracy.py", *sys.argv[1:]]),
        "settings": vars(args), "base": base, "space": space, "sampler_seed": 0, "target": target,
        "bp_lean": {"threads": cores, "curve": bp["curve"], "seconds_to_target": bp_reached and bp_reached[0],
                    "epochs_to_target": bp_reached and bp_reached[1]},
        "study_seconds": round(time.time() - started), "load_average": open("/proc/loadavg").read().split()[:3],
        **study, "curves": curves, "pareto_epochs": pareto_front(curves)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    (FIGURES / f"{name}.svg").write_text(front_figure(result, arch, int(depth)))
    reached = sorted((t for t in study["trials"] if t["state"] == "complete" and t["value"] < NOT_REACHED),
                     key=lambda t: t["value"])
    print(f"{args.case}: target {target}; BP lean {cores} threads {bp_reached}; {len(reached)} of {args.trials} "
          f"trials reached it")
    for t in reached[:5]:
        print(f"  trial {t['number']}: {t['value']:.1f} s ({t['value'] / bp_reached[0]:.2f}x BP) {t['params']}")
    print(f"importances: {study['importances']}\nwrote {out} and {FIGURES / name}.svg")


if __name__ == "__main__":
    main()
