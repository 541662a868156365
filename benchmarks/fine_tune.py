"""`al bench fine-tune`: adapting a trained model to new data by training its top component only, against training
all of its components (issue 23).

The base model learns from the rows of the first half of the classes, with every class as an output (a fine-tuned
model keeps its classes). It is then adapted with the rows of the other half (`new`) or with every row (`all`), for
the same epochs, training some of its components (--adapt-components: the top one, the first, all, or a list such
as 1,2). Beside them, a model from fresh weights trains on the same rows for the same epochs. Each run reports its
training time and its test accuracy: on the whole test set, on the classes the base learnt, on the new ones, and
at each depth.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from statistics import fmean

import numpy as np

from benchmarks.report import Destination, destination, mean_sd, publish
from benchmarks.runs import case_model

CHUNK = 4096
FRESH = "fresh"  # the reference: every component from fresh weights
COLUMNS = ["run", "trains on", "components trained", "epochs", "train seconds", "test accuracy %",
           "first-half classes %", "second-half classes %", "test accuracy % by depth", "runs"]


def test_accuracies(model_dir: Path, data, half: int) -> dict:
    """Accuracy on the test set: all of it, the rows of the first `half` classes, the rows of the others."""
    from al.checkpoint import load_model

    model = load_model(model_dir)
    predicted = []
    for i in range(0, len(data.test_x), CHUNK):
        predicted += model.predict(model.request(data.test_x[i : i + CHUNK])).classes
    index = {c: i for i, c in enumerate(data.classes)}
    correct = np.array([index[c] for c in predicted]) == data.test_y
    first = data.test_y < half
    return {"all": float(correct.mean()), "first": float(correct[first].mean()),
            "second": float(correct[~first].mean())}


def components(chosen: str, depth: int) -> list[int] | None:
    """The components an --adapt-components entry trains: "all" (None: every one), "top", or a list such as
    1,top."""
    if chosen == "all":
        return None
    return sorted({depth if k == "top" else int(k) for k in chosen.split(",")})


def bench_fine_tune(args) -> None:
    import torch

    from al.config import from_spec, make_config
    from al.data import Dataset, load_dataset
    from al.run import train

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    if args.samples:
        data = Dataset(data.train_x[: args.samples], data.train_y[: args.samples], data.test_x, data.test_y,
                       data.classes, data.name)
    half = data.num_classes // 2
    first = data.train_y < half
    rows = {"first": first, "new": ~first, "all": np.ones(len(first), dtype=bool)}

    def subset(which: str) -> Dataset:  # every class stays an output, with rows of some of them
        return Dataset(data.train_x[rows[which]], data.train_y[rows[which]], data.test_x, data.test_y, data.classes,
                       f"{data.name}-{which}")

    model = case_model(args.arch, args.depth, args.mlp_width)
    name = f"fine-tune-{data.name}-{args.arch}"
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        training = {"batch_size": args.batch_size, "seed": seed, "device": args.device, "lr": args.lr}
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp) / "base"
            result = train(subset("first"), base, make_config(args.preset, model,
                                                              {**training, "epochs": args.base_epochs}))
            record(runs, "base", result, test_accuracies(base, data, half))
            base_config = json.loads((base / "config.json").read_text())
            for which in args.adapt_rows:
                for adaptation in [*args.adapt_components, FRESH]:
                    out = Path(tmp) / f"{which}-{adaptation}"
                    adapt = {**training, "epochs": args.adapt_epochs}
                    if adaptation == FRESH:
                        config = make_config(args.preset, model, adapt)
                    else:
                        config = from_spec({"preset": args.preset, "training": adapt,
                                            "init_from": {"directory": str(base)},
                                            "train_components": components(adaptation, args.depth)}, base_config)
                    result = train(subset(which), out, config)
                    record(runs, f"{which}/{adaptation}", result, test_accuracies(out, data, half))
                    # After every run, so that an interrupted benchmark still publishes what it measured.
                    publish_fine_tune(destination(args), name, args, data, half, runs)


def record(runs: dict[str, list[dict]], key: str, result: dict, accuracy: dict) -> None:
    runs.setdefault(key, []).append({"train_seconds": result["train_seconds"], "epochs": result["epochs"],
                                     "accuracy": accuracy, "accuracy_by_depth": result["test_accuracy_by_depth"]})
    print(f"{key}: {result['train_seconds']:.1f} s, test accuracy {accuracy['all']:.4f} (first half "
          f"{accuracy['first']:.4f}, second half {accuracy['second']:.4f})", file=sys.stderr)


def publish_fine_tune(where: Destination, name: str, args, data, half: int, runs: dict[str, list[dict]]) -> None:
    first, second = f"classes 0-{half - 1}", f"classes {half}-{data.num_classes - 1}"
    table = []
    for key, results in runs.items():
        which, _, adaptation = key.partition("/")
        if not adaptation:  # the base
            trains_on, trained = f"rows of {first}", "all (fresh weights)"
        else:
            trains_on = f"rows of {second}" if which == "new" else "every row"
            chosen = None if adaptation == FRESH else components(adaptation, args.depth)
            trained = ("all (fresh weights)" if adaptation == FRESH else "all, from the base" if chosen is None
                       else f"{', '.join(map(str, chosen))} of {args.depth}")
        cells = {k: mean_sd([100 * r["accuracy"][k] for r in results]) for k in ("all", "first", "second")}
        seconds = mean_sd([r["train_seconds"] for r in results])
        table.append({
            "run": key,
            "trains on": trains_on,
            "components trained": trained,
            "epochs": results[0]["epochs"],
            "train seconds": f"{seconds[0]:.1f} +- {seconds[1]:.1f}",
            "test accuracy %": f"{cells['all'][0]:.2f} +- {cells['all'][1]:.2f}",
            "first-half classes %": f"{cells['first'][0]:.2f} +- {cells['first'][1]:.2f}",
            "second-half classes %": f"{cells['second'][0]:.2f} +- {cells['second'][1]:.2f}",
            "test accuracy % by depth": " / ".join(f"{100 * fmean(depths):.1f}" for depths in
                                                   zip(*(r["accuracy_by_depth"] for r in results))),
            "runs": len(results),
        })
    publish(
        where,
        name=name,
        title=f"Fine-tuning: {data.name}, {args.arch} with {args.depth} components, the top component only against "
        "all",
        columns=COLUMNS,
        rows=table,
        notes=(
            f"The base trains on the rows of {first} ({int((data.train_y < half).sum())} training rows) with all "
            f"{data.num_classes} classes as outputs; each adaptation starts from it (al train --init-from, with "
            "--train-components the components named) and trains on the rows named. `fresh` trains the same rows "
            "from fresh weights for the same epochs. A frozen component costs a forward pass per mini-batch, no "
            "backward and no optimizer step. Train seconds: the training loop (al.run.train's train_seconds), no "
            "data loading or "
            f"evaluation. Test accuracy on the whole test set ({len(data.test_y)} rows) and on its rows of each half "
            f"of the classes, after the last epoch; by depth k: the shortcut path f_1..f_k -> b_k -> h_k..h_1 on the "
            f"whole test set (mean over seeds). Preset {args.preset}, batch {args.batch_size}; mean +- sample "
            f"standard deviation over seeds 0..runs-1. {verdict(runs)}"
        ),
        raw={"runs": runs, "settings": {k: v for k, v in vars(args).items() if k != "func"}},
    )


def verdict(runs: dict[str, list[dict]]) -> str:
    """Each partial adaptation against training all components, for each set of adaptation rows, in words."""
    said = []
    for key, partial in runs.items():
        which, _, adaptation = key.partition("/")
        every = runs.get(f"{which}/all")
        if adaptation in ("", "all", FRESH) or not every:
            continue
        speed = fmean(r["train_seconds"] for r in every) / fmean(r["train_seconds"] for r in partial)
        gap = 100 * (fmean(r["accuracy"]["all"] for r in partial) - fmean(r["accuracy"]["all"] for r in every))
        said.append(f"{key} trained {speed:.1f}x as fast as {which}/all, at {gap:+.2f} points of test accuracy")
    return ("Result: " + "; ".join(said) + ".") if said else ""
