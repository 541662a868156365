"""The published study (docs/benchmarks.md, "A hyperparameter study"): AL's switches searched with
Optuna on a Fashion-MNIST subset (mlp, 2 components), then the best settings against the `default`
and `paper` presets over 3 seeds. A CPU budget: SAMPLES training samples, EPOCHS epochs per run.

    nice -n 10 .venv/bin/python benchmarks/study-fashion-mnist.py   # writes benchmarks/results/study-fashion-mnist.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from al.config import from_spec
from al.run import train
from al.study import apply_params, run_local
from al.trainer import Callback
from benchmarks.runs import subset_file

SAMPLES, EPOCHS, TRIALS, SEEDS = 3000, 2, 30, (0, 1, 2)
# 2 components, narrower than the presets' 512 (and n = 128, not 512) so that 39 runs fit a busy 2-core CPU.
BASE = {"model": {"arch": "mlp", "widths": [256, 256], "target_width": 128}, "preset": "default",
        "training": {"epochs": EPOCHS}}
SPACE = {
    "training.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "training.target_lr_factor": {"type": "float", "low": 0.5, "high": 8, "log": True},
    "training.schedule": {"type": "categorical", "choices": ["step", "cosine", "none"]},
    "training.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
    "training.detach_target": {"type": "categorical", "choices": [True, False]},
    "model.encoder_activation": {"type": "categorical", "choices": ["elu", "relu", "tanh"]},
    "model.bridge_activation": {"type": "categorical", "choices": ["sigmoid", "tanh", "elu", "identity"]},
    "model.target_activation": {"type": "categorical", "choices": ["sigmoid", "tanh"]},
    "model.bridge_depth": {"type": "int", "low": 1, "high": 3},
    "model.bridge_hidden_factor": {"type": "int", "low": 1, "high": 5},
    "model.h1_loss": {"type": "categorical", "choices": ["mse", "ce"]},
}
OUT = Path(__file__).parent / "results" / "study-fashion-mnist.json"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class TrialLog(Callback):
    def __init__(self, number: int):
        self.number = number

    def on_train_end(self, trainer, result):
        log(f"trial {self.number}: {result['status']} after {result['epochs']} epochs, "
            f"val {result.get('val_accuracy')}, {result['train_seconds']:.0f} s")


def main() -> None:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        data = str(subset_file("fashion-mnist", SAMPLES, Path(tmp)))
        log(f"study: {TRIALS} trials")
        study = run_local(data, BASE, SPACE, TRIALS, Path(tmp) / "study", seed=0, callbacks=lambda n: [TrialLog(n)])
        study["best"].pop("model")  # a temporary directory
        study_seconds = time.time() - started
        log(f"study done in {study_seconds:.0f} s; best {study['best']}")
        candidates = {"best": apply_params(BASE, study["best"]["params"]),
                      "default": {**BASE, "preset": "default"}, "paper": {**BASE, "preset": "paper"}}
        comparison = {}
        for label, spec in candidates.items():
            runs = []
            for seed in SEEDS:
                config = from_spec(apply_params(spec, {"training.seed": seed}))
                result = train(data, Path(tmp) / f"{label}-{seed}", config)
                kept = ("test_accuracy", "val_accuracy", "train_seconds")
                runs.append({"seed": seed, **{k: result[k] for k in kept}})
                log(f"{label} seed {seed}: test {result['test_accuracy']:.4f}")
            comparison[label] = {"spec": spec, "runs": runs}
    OUT.write_text(json.dumps({
        "command": "nice -n 10 .venv/bin/python benchmarks/study-fashion-mnist.py",
        "dataset": f"fashion-mnist, first {SAMPLES} training samples (benchmarks.runs.subset_file)",
        "epochs": EPOCHS, "base": BASE, "space": SPACE, "sampler_seed": 0, "study_seconds": round(study_seconds),
        "total_seconds": round(time.time() - started), **study, "comparison": comparison,
    }, indent=1) + "\n")
    log(f"wrote {OUT}")


if __name__ == "__main__":
    main()
