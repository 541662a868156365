"""`al bench accuracy`: AL next to BP on one dataset and architecture, last-epoch test accuracy and time."""

from __future__ import annotations

import sys
import tempfile

from benchmarks.report import Destination, destination, mean_sd, publish


def bench_accuracy(args) -> None:
    from al.config import make_config
    from al.data import load_dataset
    from al.run import train

    data = load_dataset(args.dataset)
    # The presets name the table unless it is `default` alone, whose tables came first.
    name = "-".join(["accuracy", args.dataset, args.arch, *sorted(set(args.presets) - {"default"})])
    runs: dict[str, list[dict]] = {}
    for preset in args.presets:
        for method in ("al", "bp"):
            key = f"{method}/{preset}"
            runs[key] = []
            for seed in range(args.seeds):
                training = {"method": method, "epochs": args.epochs, "seed": seed, "device": args.device,
                            "batch_size": args.batch_size}
                with tempfile.TemporaryDirectory() as out:
                    result = train(data, out, make_config(preset, {"arch": args.arch}, training))
                runs[key].append(result)
                print(f"{key} seed {seed}: test_accuracy {result['test_accuracy']:.4f} "
                      f"({result['train_seconds']:.1f}s)", file=sys.stderr)
                # After every run, so that an interrupted benchmark still publishes what it measured.
                publish_accuracy(destination(args), name, args.dataset, args.arch, args.epochs, runs)


def publish_accuracy(where: Destination, name: str, dataset: str, arch: str, epochs: int, runs: dict[str, list[dict]],
                     **record) -> None:
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
        where,
        name=name,
        title=f"Accuracy: AL vs BP, {dataset}, {arch}, {epochs} epochs",
        columns=["method / preset", "test accuracy % (last epoch)", "seconds / epoch", "runs"],
        rows=rows,
        notes="BP trains the same inference topology (f_1..f_L -> b_L -> h_L..h_1) with cross-entropy. "
        "Mean +- sample standard deviation over seeds 0..runs-1; test accuracy of the last epoch.",
        raw={"runs": runs, **record},
    )
