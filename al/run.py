"""Train, evaluate and predict with model directories: what the CLI and the worker call."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from al.checkpoint import (
    CONFIG,
    TRAINING_STATE,
    LoadedModel,
    check_same_data,
    load_model,
    model_config_json,
    read_metrics,
    save_model,
)
from al.config import PLACEMENT, TEXT_ARCHS, ModelConfig, RunConfig
from al.data import TENSOR, TEXT, TEXT_COLUMN, DataError, Dataset, load_dataset, prepare_splits
from al.model import build_network
from al.pipeline import ProcessesRunner, pipeline_runner
from al.trainer import Callback, Trainer


class SaveEachEpoch(Callback):
    """A resumable checkpoint and the model files after every epoch and when the run ends, each time that
    `may_save()` allows (a service: this attempt still holds the job); then `saved()` (a service: upload them)."""

    def __init__(self, directory: Path, config: dict, may_save: Callable[[], bool], saved: Callable[[], None],
                 files: dict[str, str]):
        self.directory, self.config, self.may_save, self.saved = directory, config, may_save, saved
        self.files = files  # beside the weights: a text model's tokenizer

    def on_epoch_end(self, trainer, metrics):
        self.save(trainer, self.config)

    def on_train_end(self, trainer, result):
        self.save(trainer, {**self.config, "result": result})

    def save(self, trainer, config: dict) -> None:
        if self.may_save():
            # Model files first: a checkpoint without its config.json beside it would not resume.
            save_model(self.directory, trainer.net, config, trainer.history, self.files)
            trainer.save_checkpoint(self.directory / TRAINING_STATE)
            self.saved()


def run_changes(saved: dict, config: dict) -> list[str]:
    """What differs between a checkpoint's run and this one: any of it would mix two runs' data or settings."""
    changed = ["method"] if saved["method"] != config["method"] else []
    if saved.get("dataset_fingerprint") != config["dataset_fingerprint"]:
        changed.append("the dataset")
    if saved.get("init_from") != config["init_from"]:
        changed.append("init_from")
    changed += [f"model.{key}" for key in config["model"] if saved["model"].get(key) != config["model"][key]]
    changed += [f"training.{key}" for key in config["training"]
                if key not in PLACEMENT and saved["training"].get(key) != config["training"][key]]
    return changed


def train(
    dataset: str | Dataset,
    out_dir: str | Path,
    config: RunConfig,
    callbacks: list[Callback] = (),
    resume: bool = False,
    may_save: Callable[[], bool] = lambda: True,
    saved: Callable[[], None] = lambda: None,
    init_dir: str | Path | None = None,
) -> dict:
    """Train a model of `config` (al.config.make_config or from_spec) into `out_dir`; with `resume`, continue
    from its checkpoint if there is one. Each save first asks `may_save()` (a worker whose lease was lost must
    not overwrite its successor's checkpoint), and then calls `saved()`. A config with `init_from` starts from
    that trained model's weights and input encoding: the model in `init_dir` (default: the directory that
    init_from names, as `al train --init-from` gives it)."""
    model_cfg, train_cfg = config.model, config.training
    data = load_for(model_cfg.arch, dataset, model_cfg.text_column)
    start = starting_model(config, init_dir, data)
    out = Path(out_dir)
    torch.manual_seed(train_cfg.seed)
    splits = prepare_splits(data, train_cfg.val_fraction, train_cfg.seed, model_cfg.vocab_size, model_cfg.max_tokens,
                            start.encoding if start else None)
    input_shape = tuple(splits.train_x.shape[1:])  # a text model's: token ids
    net = start.net if start else build_network(model_cfg, input_shape, data.num_classes, train_cfg.method)
    config_json = model_config_json(
        model_cfg, train_cfg, config.preset, input_shape, data.classes, splits.encoding, data.name, data.fingerprint(),
        config.init_from,
    )
    runner = pipeline_runner(train_cfg)
    callbacks = [*callbacks, SaveEachEpoch(out, config_json, may_save, saved, splits.encoding.files())]
    trainer = Trainer(net, model_cfg, train_cfg, splits, callbacks, runner=runner)
    checkpoint = out / TRAINING_STATE
    if resume and checkpoint.is_file() and (out / CONFIG).is_file():
        changed = run_changes(json.loads((out / CONFIG).read_text()), config_json)
        if changed:
            raise ValueError(f"{out} holds a checkpoint of a different run ({', '.join(changed)} changed); resume "
                             "with the same settings and data, or use another --out")
        trainer.load_checkpoint(checkpoint)
    elif (out / CONFIG).exists() and not resume:
        raise ValueError(f"{out} already holds a model; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(runner, ProcessesRunner) and runner.is_worker:
        return runner.serve(trainer.work)  # a torchrun rank > 0 trains its stage; rank 0 does all else
    return trainer.fit()


def starting_model(config: RunConfig, directory: str | Path | None, data: Dataset) -> LoadedModel | None:
    """The trained model that config.init_from names, loaded from `directory` (default: the directory init_from
    names), if the run keeps its architecture and method and `data` fits it; ValueError names what does not."""
    if config.init_from is None:
        return None
    directory = directory or config.init_from.get("directory")
    if directory is None:
        raise ValueError(f"init_from {config.init_from} names a registered model: train() needs its directory")
    model = load_model(directory)
    theirs = dataclasses.asdict(ModelConfig(**model.config["model"]))
    differ = [f"model.{k}" for k, v in dataclasses.asdict(config.model).items() if theirs[k] != v]
    differ += ["method"] if model.config["method"] != config.training.method else []
    if differ:
        raise ValueError(f"init_from: the model in {directory} differs from this run in {', '.join(differ)}; a run "
                         "that starts from a trained model keeps its architecture and method")
    check_same_data(model.config, data.input_kind, data.input_shape, data.classes)
    return model


def load_for(arch: str, dataset: str | Dataset, text_column: str) -> Dataset:
    """The dataset an architecture trains on: texts for lstm and transformer, numbers for the others."""
    hint = f"arch {arch} reads texts, from a CSV column named {text_column!r} (text_column)"
    try:
        data = load_dataset(dataset, text_column) if isinstance(dataset, str) else dataset
    except DataError as e:
        raise DataError(f"{e}; {hint}" if arch in TEXT_ARCHS else str(e)) from None
    if arch in TEXT_ARCHS and data.input_kind != TEXT:
        raise DataError(f"{data.name} holds numbers; {hint}")
    if arch not in TEXT_ARCHS and data.input_kind == TEXT:
        raise DataError(f"{data.name} holds texts: train it with arch {' or '.join(TEXT_ARCHS)} "
                        f"(arch {arch} reads numbers)")
    return data


def evaluate(model_dir: str | Path, dataset: str | Dataset, depth: int | None = None, split: str = "test",
             exit_confidence: float | None = None) -> dict:
    """Accuracy of a saved model on a dataset's test split (or on all of its samples); with `exit_confidence`,
    each sample stops at the first depth whose top probability reaches it, and `mean_depth` says how deep they went."""
    model = load_model(model_dir)
    text_column = model.config["model"].get("text_column", TEXT_COLUMN)
    data = load_dataset(dataset, text_column) if isinstance(dataset, str) else dataset
    if split == "all":
        x = np.concatenate([data.train_x, data.test_x])
        y = np.concatenate([data.train_y, data.test_y])
    else:
        x, y = data.test_x, data.test_y
    labels = [data.classes[i] for i in y]
    unknown = sorted({str(v) for v in labels} - {str(c) for c in model.classes})
    if unknown:
        raise DataError(f"labels {', '.join(unknown[:5])} are not classes of this model ({model.classes})")
    if data.input_kind != model.input_kind:
        what = {TEXT: f"texts (a CSV with the column {text_column!r})", TENSOR: "numbers"}
        raise DataError(f"{data.name} holds {what[data.input_kind]}, the model reads {what[model.input_kind]}")
    if model.input_kind == TENSOR and tuple(x.shape[1:]) != model.input_shape:
        raise DataError(f"samples have shape {list(x.shape[1:])}, the model expects {list(model.input_shape)}")
    predictions, depths = [], []
    for i in range(0, len(x), 4096):
        chunk_predictions, _, chunk_depths = model.predict(model.request(x[i : i + 4096], depth, exit_confidence))
        predictions += chunk_predictions
        depths += chunk_depths
    correct = sum(str(p) == str(t) for p, t in zip(predictions, labels))
    result = {
        "test_accuracy": correct / len(x),
        "samples": len(x),
        "depth": depth or model.depth,
        "method": model.config["method"],
        "epochs": len(read_metrics(model_dir)),
    }
    if exit_confidence is not None:
        result.update(exit_confidence=exit_confidence, mean_depth=float(np.mean(depths)))
    return result
