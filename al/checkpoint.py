"""A model directory: model.safetensors, config.json, metrics.jsonl, a text model's tokenizer.json (and
checkpoint.pt while training).

config.json says what the model reads: `input_kind` "tensor" (numbers of `input_shape`, normalised by
`normalization`) or "text" (strings, tokenized by tokenizer.json into `input_shape` = [max_tokens] token ids;
`normalization` null); `classes` lists the class values (names) by class index.

Nothing on the load path unpickles: weights are safetensors, the rest is JSON.
Every file is written to a temporary name and renamed, so a crash never leaves
a half-written file behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from al.config import ModelConfig, TrainConfig
from al.data import TENSOR, TEXT, TOKENIZER_FILE, Normalization, TextEncoding
from al.data.text import as_texts
from al.model import ALNet, build_network

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
TOKENIZER = TOKENIZER_FILE
TRAINING_STATE = "checkpoint.pt"
MODEL_FILES = (WEIGHTS, CONFIG, METRICS)  # what every registered version holds; a job's directory adds TRAINING_STATE
OPTIONAL_MODEL_FILES = (TOKENIZER,)  # what a version holds if its model has one (a text model)


class ModelError(ValueError):
    """The model directory is missing or unusable; the message says why."""


def replace_atomically(path: str | os.PathLike, write) -> None:
    """`write(temporary_path)`, then rename it over `path`: a crash or a full disk leaves the previous file and no
    temporary one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(path, write)


def model_config_json(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    preset: str,
    input_shape: tuple[int, ...],
    classes: list,
    encoding: Normalization | TextEncoding,
    dataset: str,
    dataset_fingerprint: str,
    init_from: dict | None = None,
) -> dict:
    from al import __version__

    text = isinstance(encoding, TextEncoding)
    return {
        "library_version": __version__,
        "method": train_cfg.method,
        "preset": preset,
        "dataset": dataset,
        "dataset_fingerprint": dataset_fingerprint,
        "init_from": init_from,  # lineage: the trained model this one started from (RunConfig.init_from)
        "input_kind": TEXT if text else TENSOR,
        "input_shape": list(input_shape),
        "classes": list(classes),
        "normalization": None if text else dataclasses.asdict(encoding),
        **({"tokenizer": {"file": TOKENIZER, "vocabulary": encoding.vocabulary}} if text else {}),
        "model": dataclasses.asdict(model_cfg),
        "training": dataclasses.asdict(train_cfg),
    }


def check_same_data(model_config: dict, input_kind: str, input_shape: tuple[int, ...], classes: list) -> None:
    """A dataset that a run starting from a trained model (its config.json) can train on: the inputs that the model
    reads, and its classes (as many, the same values or names, in its order); ValueError names what differs."""
    kind = model_config.get("input_kind", TENSOR)
    words = {TEXT: "texts", TENSOR: "numbers"}
    if input_kind != kind:
        raise ValueError(f"the dataset holds {words[input_kind]}, the model reads {words[kind]}")
    if kind == TENSOR and list(input_shape) != list(model_config["input_shape"]):
        raise ValueError(f"the dataset's samples have shape {list(input_shape)}, the model reads shape "
                         f"{list(model_config['input_shape'])}")
    own = list(model_config["classes"])
    if len(classes) != len(own):
        raise ValueError(f"the dataset has {len(classes)} classes ({_listed(classes)}), the model {len(own)} "
                         f"({_listed(own)}): a run that starts from it keeps its classes")
    if list(classes) != own:
        raise ValueError(f"the dataset's classes ({_listed(classes)}) are not the model's ({_listed(own)})")


def _listed(values: list, most: int = 10) -> str:
    return ", ".join(map(repr, values[:most])) + (", ..." if len(values) > most else "")


def save_model(directory: str | os.PathLike, net: ALNet, config: dict, history: list[dict],
               files: dict[str, str] | None = None) -> None:
    """The weights, the metrics and `files` (name -> text: a text model's tokenizer), then config.json last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    replace_atomically(directory / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    for name, text in (files or {}).items():
        write_atomic(directory / name, text)
    write_atomic(directory / METRICS, "".join(json.dumps(m) + "\n" for m in history))
    write_atomic(directory / CONFIG, json.dumps(config, indent=2) + "\n")


def model_files(directory: str | os.PathLike) -> list[str]:
    """The names of the files a registered version of the model in `directory` holds."""
    return [*MODEL_FILES, *(name for name in OPTIONAL_MODEL_FILES if (Path(directory) / name).is_file())]


def copy_model(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """The model files of `source` (not its training checkpoint) as the new directory `destination`, all or
    nothing: copied under a temporary name, then renamed (which fails if `destination` exists)."""
    source, destination = Path(source), Path(destination)
    staging = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a copy that crashed
    staging.mkdir(parents=True)
    try:
        for name in model_files(source):
            shutil.copyfile(source / name, staging / name)
        os.rename(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class Prediction(NamedTuple):
    classes: list  # the predicted class value of each row
    probabilities: list[list[float]]  # of every class, per row
    depths: list[int]  # the depth k of the path f_1..f_k -> b_k -> h_k..h_1 that answered each row


class InferenceRequest(NamedTuple):
    """Rows for one model and how far they may go, as `LoadedModel.request` checked them: nothing checks
    them again on the way to the network."""

    x: np.ndarray  # float32 rows of the model's input shape, every value finite; a text model's: (N,) strings
    depth: int | None = None  # the deepest path to take, 1..depth (None: the full one)
    exit_confidence: float | None = None  # each row stops at the first depth this sure of it (ALNet.predict)


class LoadedModel:
    """A trained model ready for inference: raw inputs in (numbers, or strings for a text model), class values out."""

    def __init__(self, net: ALNet, config: dict, encoding: Normalization | TextEncoding):
        self.net = net.eval()
        self.config = config
        self.classes = config["classes"]
        self.input_kind = config.get("input_kind", TENSOR)  # written since text models came; before, numbers
        self.input_shape = tuple(config["input_shape"])
        self.encoding = encoding

    @property
    def depth(self) -> int:
        return self.net.depth

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    def request(self, x, depth: int | None = None, exit_confidence: float | None = None) -> InferenceRequest:
        """Raw samples checked against this model: the one check on the way to `predict`. Numbers of shape
        (N, *input_shape) or (N, features) become float32 rows of the input shape; texts (a sequence of str, for
        a text model) an object array (N,). ValueError names whatever does not fit."""
        x = self._checked_texts(x) if self.input_kind == TEXT else self._checked_numbers(x)
        if depth is not None and not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be between 1 and {self.depth} for this model, got {depth}")
        if exit_confidence is not None and not 0 <= exit_confidence <= 1:
            raise ValueError(f"exit_confidence must be between 0 and 1, got {exit_confidence}")
        return InferenceRequest(x, depth, exit_confidence)

    def _checked_numbers(self, x) -> np.ndarray:
        if np.asarray(x).dtype.kind in "USO":
            raise ValueError(f"this model reads numbers (each input {self.num_features} values, shape "
                             f"{list(self.input_shape)}), not text")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.num_features:
            raise ValueError(
                f"each input must have {self.num_features} values (shape {list(self.input_shape)}), "
                f"got shape {list(x.shape[1:])}"
            )
        if not np.isfinite(x).all():
            raise ValueError("inputs contain NaN or infinity")
        return x.reshape(len(x), *self.input_shape)

    @staticmethod
    def _checked_texts(x) -> np.ndarray:
        if isinstance(x, str) or not isinstance(x, list | tuple | np.ndarray) or np.ndim(x) != 1:
            raise ValueError("this model reads texts: give a list of strings")
        wrong = next((item for item in x if not isinstance(item, str)), None)
        if wrong is not None:
            raise ValueError(f"this model reads texts (strings), got {type(wrong).__name__} {str(wrong)[:40]!r}")
        for i, text in enumerate(x):
            try:
                text.encode("utf-8")  # the tokenizer takes only what UTF-8 can hold: no lone surrogate (JSON "\ud800")
            except UnicodeEncodeError as e:
                raise ValueError(f"text {i} is not valid Unicode: {e.reason} at character {e.start}") from None
        return as_texts(x)

    def predict(self, request: InferenceRequest) -> Prediction:
        """Class values, probabilities and the depth each row used, for a request made by `request`. A text
        longer than the model's max_tokens is cut after that many tokens."""
        x = self.encoding.apply(request.x)
        device = next(self.net.parameters()).device
        indices, probabilities, depths = self.net.predict(x.to(device), request.depth, request.exit_confidence)
        return Prediction([self.classes[i] for i in indices.tolist()], probabilities.cpu().tolist(), depths.tolist())


@dataclass
class ModelInfo:
    """What a registry shows of a model directory: its config.json and the size of its weights, read from the
    safetensors header; the weights themselves are not loaded."""

    config: dict
    parameters: int
    depth: int  # components

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.config["input_shape"])

    @property
    def input_kind(self) -> str:
        """"tensor" (numbers of input_shape) or "text" (strings)."""
        return self.config.get("input_kind", TENSOR)


# A damaged directory (truncated weights, an unreadable file, a config of the wrong shape) is a ModelError like
# any other unusable model, never an error that reaches a server as a 500.
DAMAGE = (KeyError, TypeError, ValueError, RuntimeError, OSError, SafetensorError)


def read_model_info(directory: str | os.PathLike) -> ModelInfo:
    directory = _model_directory(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
        with safe_open(str(directory / WEIGHTS), "pt") as weights:
            names = list(weights.keys())
            parameters = sum(math.prod(weights.get_slice(k).get_shape()) for k in names)
        depth = len({name.split(".")[1] for name in names if name.startswith("components.")})
        info = ModelInfo(config, parameters, depth)
        info.input_shape, config["classes"], config["method"], config["normalization"]  # noqa: B018 - what readers use
        if info.input_kind == TEXT and not (directory / TOKENIZER).is_file():
            raise ValueError(f"a text model without its {TOKENIZER}")
    except DAMAGE as e:
        raise ModelError(f"{directory}: unusable model ({type(e).__name__}: {e})") from None
    return info


def _model_directory(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise ModelError(f"{directory} is not a model directory (needs {CONFIG} and {WEIGHTS})")
    return directory


def load_model(directory: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    directory = _model_directory(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    try:
        config = json.loads(config_path.read_text())
        model_cfg = ModelConfig(**config["model"])
        net = build_network(model_cfg, tuple(config["input_shape"]), len(config["classes"]), config["method"])
        net.load_state_dict(load_file(str(weights_path)))
        if config.get("input_kind", TENSOR) == TEXT:
            encoding = TextEncoding.load(directory / TOKENIZER)
        else:
            encoding = Normalization(**config["normalization"])
    except DAMAGE as e:
        raise ModelError(f"{directory}: unusable model ({type(e).__name__}: {e})") from None
    return LoadedModel(net.to(device), config, encoding)


def read_metrics(directory: str | os.PathLike) -> list[dict]:
    path = Path(directory) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
