"""What the training benchmarks share: a dataset subset on disk, a trainer built from a JSON run spec, and
each run in a fresh Python process, so that its peak memory is its own and no thread setting leaks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from al.config import PRESETS, TEXT_ARCHS, ModelConfig, Preset


def subset_file(dataset: str, samples: int, directory: Path) -> Path:
    """The first `samples` training samples of a dataset (and a quarter as many test samples) as an .npz, or as a
    CSV of texts and labels for a text dataset, so that runs load little."""
    from al.data import TEXT, load_dataset

    data = load_dataset(dataset)
    x = np.concatenate([data.train_x[:samples], data.test_x[: samples // 4]])
    y = np.asarray(data.classes)[np.concatenate([data.train_y[:samples], data.test_y[: samples // 4]])]
    if data.input_kind == TEXT:
        path = directory / f"{Path(dataset).stem}-{samples}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *zip(x, y)])
        return path
    path = directory / f"{dataset}-{samples}.npz"
    np.savez(path, x=x, y=y)
    return path


def case_model(arch: str, depth: int, mlp_width: int, preset: str | None = None, method: str = "al") -> dict:
    """The model of a benchmark case: `depth` components of the architecture, with the case's code width and
    pooling but where `preset` chooses its own for `method` (the cnn's `default` does for AL: the case then
    measures the preset)."""
    if arch in TEXT_ARCHS:  # the embedding, then depth - 1 layers of the library's default sizes
        return {"arch": arch, "widths": ModelConfig(arch=arch).resolved().widths[:1] * (depth - 1)}
    case = {
        "mlp": {"arch": "mlp", "widths": [mlp_width] * depth, "target_width": mlp_width // 4},
        "cnn": {"arch": "cnn", "widths": [16, 32, 32, 64][:depth], "target_width": 128, "bridge_pool": 4},
    }[arch]
    own, _ = (PRESETS[preset] if preset else Preset()).values_for(arch, method)
    return {key: value for key, value in case.items() if key not in own}


def table_name(base: str, archs, kind: str) -> str:
    """A benchmark's table: text models' cases get tables of their own, beside the others'."""
    return f"{base}-text-{kind}" if any(arch in TEXT_ARCHS for arch in archs) else f"{base}-{kind}"


def build_trainer(spec: dict, callbacks=(), **training):
    """The trainer of a run spec {"data", "model", "training", "threads", "preset"?}, with `training` on top."""
    from al.config import make_config
    from al.data import load_dataset, prepare_splits
    from al.model import build_network
    from al.pipeline import pipeline_runner
    from al.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    data = load_dataset(spec["data"])
    config = make_config(spec.get("preset", "default"), spec["model"], {**spec["training"], **training})
    model_cfg, train_cfg = config.model, config.training
    torch.manual_seed(train_cfg.seed)
    splits = prepare_splits(data, train_cfg.val_fraction, train_cfg.seed, model_cfg.vocab_size, model_cfg.max_tokens)
    net = build_network(model_cfg, tuple(splits.train_x.shape[1:]), data.num_classes, train_cfg.method)
    return Trainer(net, model_cfg, train_cfg, splits, callbacks, runner=pipeline_runner(train_cfg))


def fresh_process(module: str, spec: dict) -> list[str]:
    """The command of a run: `python -m module SPEC_JSON`, whose last line of output is the run's JSON result."""
    return [sys.executable, "-m", module, json.dumps(spec)]


def run_result(spec: dict, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise RuntimeError(f"benchmark run {spec} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_in_fresh_process(module: str, spec: dict) -> dict:
    done = subprocess.run(fresh_process(module, spec), capture_output=True, text=True, timeout=3600)
    return run_result(spec, done.returncode, done.stdout, done.stderr)
