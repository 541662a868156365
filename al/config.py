"""Configuration of an AL network and its training, the named presets, and the job spec that names them.

Each field is declared once, here, with what it means and its limits (`setting`). The command line,
the service's HTTP schema (service/jobspec.py derives it from these fields) and the studies' search
space (al/study.py) read them from here. Every choice the reference code (R1) hard-codes is a field;
the `paper` preset holds R1's values as README.md ("Presets") lists them.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TEXT_ARCHS = ("lstm", "transformer")  # read texts (al/data/text.py); the others read numbers
ARCHS = ("mlp", "cnn", "resnet", *TEXT_ARCHS)
METHODS = ("al", "bp")
ACTIVATIONS = ("elu", "relu", "sigmoid", "tanh", "identity")
SCHEDULES = ("step", "cosine", "none")
PIPELINES = ("sequential", "threads", "processes")
H1_LOSSES = ("mse", "ce")
MAX_WIDTH = 8192
MAX_COMPONENTS = 32
# Conv components and their training (issue 22)
INITS = ("he_normal", "he_fan_out", "xavier_normal", "xavier_uniform", "orthogonal", "torch")
LR_SCALINGS = ("none", "linear", "sqrt")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


@dataclass(frozen=True)
class Limits:
    """What a field means and which values it takes; for a list, the bounds apply to each item."""

    doc: str
    choices: tuple | None = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    items: tuple[int, int] | None = None  # a list's least and most items
    pattern: str | None = None  # a string's (or each string item's) form
    max_length: int | None = None  # a string's most characters
    search: bool = False  # a study may search it (al/study.py)


def setting(default: Any, doc: str, **limits) -> Any:
    return field(default=default, metadata={"limits": Limits(doc, **limits)})


def limits_of(cls) -> dict[str, Limits]:
    return {f.name: f.metadata["limits"] for f in dataclasses.fields(cls)}


def value_type(cls, name: str) -> type:
    """A field's type without its None: int, float, bool, str, or list[...] (e.g. `int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] if typing.get_origin(hint) in (
        types.UnionType, typing.Union) else [hint]
    return kinds[0]


@dataclass
class ModelConfig:
    arch: str = setting("mlp", "mlp | cnn | resnet (numbers) | lstm | transformer (texts)", choices=ARCHS)
    widths: list[int] | None = setting(
        None, "mlp: width of each component's encoder; cnn: channels per block; resnet: stem then stages; "
        "lstm: hidden units per direction of each bidirectional LSTM layer; transformer: feed-forward width of each "
        "encoder layer (lstm, transformer: one layer per entry, each a component after the embedding's)",
        ge=1, le=MAX_WIDTH, items=(1, MAX_COMPONENTS))
    target_width: int | None = setting(None, "n, the width of the label codes t_i", ge=1, le=MAX_WIDTH,
                                       search=True)
    encoder_activation: str = setting("elu", "activation of the encoders f_i", choices=ACTIVATIONS, search=True)
    bridge_activation: str = setting("sigmoid", "activation of the bridges b_i", choices=ACTIVATIONS, search=True)
    target_activation: str = setting("sigmoid", "activation of g_i and h_i (i > 1)", choices=ACTIVATIONS,
                                     search=True)
    bridge_hidden_factor: int = setting(5, "hidden bridge layer is factor * n wide", ge=1, le=64, search=True)
    bridge_depth: int = setting(2, "dense layers in each bridge", ge=1, le=16, search=True)
    bridge_pool: int | None = setting(None, "conv maps: adaptive-average-pool to PxP before b_i", ge=1, le=64,
                                       search=True)
    h1_loss: str = setting("mse", "loss of h_1 against the label: mse | ce", choices=H1_LOSSES, search=True)
    # Conv components (issue 22): what b_i sees of a conv map, each component's code width, the initialisation.
    bridge_convs: int = setting(0, "conv maps: 3x3 conv layers (with batch norm and the encoder activation) in "
                                "each bridge before its pooling", ge=0, le=2, search=True)
    target_widths: list[int] | None = setting(
        None, "the width of each component's label code t_i (default: target_width for every one)",
        ge=1, le=MAX_WIDTH, items=(1, MAX_COMPONENTS))
    init: str = setting("he_normal", "initial weights (biases zero but with torch): he_normal (R1), he_fan_out, "
                        "xavier_normal, xavier_uniform, orthogonal, torch (PyTorch's defaults)", choices=INITS,
                        search=True)
    # Texts (lstm, transformer): component 1's encoder is the token embedding.
    embedding_dim: int | None = setting(None, "lstm, transformer: width of the token embeddings (transformer: of "
                                         "every layer)", ge=1, le=MAX_WIDTH, search=True)
    heads: int = setting(4, "transformer: attention heads of each layer (they divide embedding_dim)", ge=1, le=64)
    max_tokens: int = setting(64, "lstm, transformer: tokens of a text that the model reads; a longer text is cut "
                              "after this many tokens", ge=1, le=4096, search=True)
    vocab_size: int = setting(8000, "lstm, transformer: most distinct tokens, learnt from the training split "
                              "(the most frequent; two are padding and unknown)", ge=3, le=1_000_000, search=True)
    text_column: str = setting("text", "lstm, transformer: the CSV column that holds the texts",
                               pattern=r"^[^\r\n]+$", max_length=128)

    def resolved(self) -> ModelConfig:
        """Fill the per-architecture defaults."""
        defaults = {
            "mlp": ([512, 512], 512),
            "cnn": ([32, 64, 128, 256], 256),
            "resnet": ([16, 16, 32, 64], 256),
            # Text: sizes tuned on the Debian packages' validation split for a 2-core CPU (docs/benchmarks.md, Texts)
            "lstm": ([64], 128),
            "transformer": ([128], 128),
        }
        if self.arch not in defaults:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        widths, target_width = defaults[self.arch]
        return dataclasses.replace(
            self,
            widths=list(self.widths or widths),
            target_width=self.target_width or target_width,
            embedding_dim=self.embedding_dim or (64 if self.arch in TEXT_ARCHS else None),
        )


@dataclass
class TrainConfig:
    method: str = setting("al", "al (associated learning) | bp (end-to-end backpropagation)", choices=METHODS,
                          search=True)
    epochs: int = setting(20, "passes over the training split", ge=1, le=1000, search=True)
    batch_size: int = setting(32, "samples per step", ge=1, le=65536, search=True)
    lr: float = setting(1e-4, "learning rate of f and b (BP: of the whole net)", gt=0, le=10, search=True)
    target_lr_factor: float = setting(2.0, "g and h learn at lr * factor", gt=0, le=100, search=True)
    associated_weight: float = setting(1.0, "weight of the associated losses", ge=0, le=1e6, search=True)
    autoencoder_weight: float = setting(1.0, "weight of the autoencoder losses", ge=0, le=1e6, search=True)
    detach_target: bool = setting(True, "stop the gradient of t_i in the associated loss (False can collapse t_i)",
                                  search=True)
    schedule: str = setting("step", "learning-rate schedule: step | cosine | none", choices=SCHEDULES, search=True)
    # Learning-rate levers (issue 22); at their defaults they change nothing.
    bridge_lr_factor: float = setting(1.0, "AL: b_i learn at lr * factor (f_i at lr)", gt=0, le=100, search=True)
    lr_scaling: str = setting("none", "lr scaled with the batch size: none, linear or sqrt of "
                              "batch_size / lr_reference_batch", choices=LR_SCALINGS, search=True)
    lr_reference_batch: int = setting(32, "the batch size at which lr_scaling leaves lr as given", ge=1, le=65536)
    lr_warmup: int = setting(0, "steps over which every learning rate ramps linearly up to its value", ge=0,
                             le=10**7, search=True)
    target_warmup: int = setting(0, "AL: steps over which g_i and h_i's learning rate ramps linearly up to its "
                                 "value", ge=0, le=10**7, search=True)
    seed: int = setting(0, "seeds initialisation and batch order", ge=0, le=2**31 - 1)
    val_fraction: float = setting(0.1, "share of the training split held out for validation", ge=0, lt=1)
    device: str = setting("auto", "auto (CUDA if present), cpu, cuda, cuda:N", pattern=DEVICE_PATTERN,
                          max_length=32)
    # Pipelined AL (al/pipeline/): stages of consecutive components train at once. Where a run computes,
    # not what: the pipeline is bit-identical to sequential training.
    pipeline: str = setting("sequential", "sequential: one device; threads / processes: stages of components "
                            "train at once", choices=PIPELINES)
    devices: list[str] | None = setting(
        None, "sequential: the one device to train on; pipelined: one device per stage (default: the cores or "
        "GPUs, up to the depth)", pattern=DEVICE_PATTERN, items=(1, MAX_COMPONENTS))
    stages: str | None = setting(None, 'components per stage, e.g. "0-1,2-3" (default: balanced by time)',
                                 pattern=r"^[0-9,\- ]+$", max_length=256)
    queue_depth: int = setting(2, "mini-batches that may wait between two stages", ge=1, le=64)
    stage_threads: int | None = setting(None, "CPU threads per stage (default: the cores shared out)", ge=1, le=256)
    stage_timeout: float = setting(300.0, "seconds a stage waits for a message before the run fails", gt=0,
                                   le=86400)
    # Fine-tuning (issue 23): a run that starts from a trained model (RunConfig.init_from) may train some components.
    train_components: list[int] | None = setting(
        None, "AL, starting from a trained model (init_from): the components that train, numbered from 1 as depths "
        "are (component k holds f_k, b_k, g_k, h_k); the others stay frozen and cost a forward pass each "
        "(default: all train)", ge=1, le=MAX_COMPONENTS, items=(1, MAX_COMPONENTS))


# Where a run computes, not what it computes: a run may resume with other values of these.
PLACEMENT = frozenset({"device", "pipeline", "devices", "stages", "queue_depth", "stage_threads", "stage_timeout"})


@dataclass
class Preset:
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    # Per architecture, on top of `model` and `train`: where that architecture measured better with other values.
    by_arch: dict[str, Preset] = field(default_factory=dict)
    # Per method (within an architecture's), on top of the rest: what AL measured better with and BP did not.
    by_method: dict[str, Preset] = field(default_factory=dict)

    def values_for(self, arch: str, method: str) -> tuple[dict, dict]:
        """The (model, training) values for an architecture and method: the preset's, then the architecture's,
        then the method's within it."""
        for_arch = self.by_arch.get(arch, Preset())
        for_method = for_arch.by_method.get(method, Preset())
        return ({**self.model, **for_arch.model, **for_method.model},
                {**self.train, **for_arch.train, **for_method.train})


TANH_CODES = {"bridge_activation": "tanh", "target_activation": "tanh"}

PRESETS: dict[str, Preset] = {
    # R1 as published.
    "paper": Preset(),
    # R1 with a 10x learning rate and a cosine schedule: R1's step schedule was
    # tuned for 200 epochs; over tens of epochs it cuts the rate too early.
    # `al bench accuracy` backs this choice (docs/benchmarks.md).
    # Conv nets with tanh bridges and codes: with R1's sigmoid ones they sat near chance for their first 2-4 epochs
    # on digits; at 20 epochs tanh scored 0.56 points below to 0.9 above (docs/benchmarks.md, "The default preset").
    # The mlp keeps R1's, 0.5-0.9 points better on Fashion-MNIST. Texts at lr 3e-3: AL's validation accuracy
    # 2.4-2.6 points higher on each of 3 seeds of the Debian packages set (docs/benchmarks.md, Texts).
    # The cnn's AL: the network that both time-to-accuracy studies (2 and 4 components) chose, codes of 64 and
    # one-layer tanh bridges that see the map through a 3x3 conv pooled to 2x2, ReLU encoders, with one set of
    # rates that held at both depths and on digits. BP lost 1.6 points on that network at 20 epochs and keeps its
    # own (docs/benchmarks.md, "One setting for the cnn").
    "default": Preset(train={"lr": 1e-3, "schedule": "cosine"},
                      by_arch={"cnn": Preset(model=TANH_CODES, by_method={"al": Preset(
                                   model={"target_width": 64, "bridge_convs": 1, "bridge_pool": 2, "bridge_depth": 1,
                                          "encoder_activation": "relu"},
                                   train={"lr": 5e-3, "target_lr_factor": 3.0, "bridge_lr_factor": 2.0,
                                          "target_warmup": 130})}),
                               "resnet": Preset(model=TANH_CODES),
                               **{arch: Preset(train={"lr": 3e-3}) for arch in TEXT_ARCHS}}),
    # Lean and quick to start: one-layer bridges (R1's two-layer 5n bridges are most of an MLP's
    # FLOPs), tanh codes and bridges, with which AL learns from its first epoch where sigmoid codes
    # sit near chance for one or two, and ReLU encoders. `al bench time-to-accuracy` measures it.
    "lean": Preset(model={"bridge_depth": 1, "target_activation": "tanh", "bridge_activation": "tanh",
                          "encoder_activation": "relu"},
                   train={"lr": 2e-3, "schedule": "cosine"}),
}


@dataclass
class RunConfig:
    """Everything a training run needs besides its data: the preset it started from, the network, the training,
    and the trained model it starts from, if any."""

    preset: str
    model: ModelConfig
    training: TrainConfig
    # The trained model whose weights the run starts from, as the new model's config.json names it (its lineage):
    # {"directory": ...} (al train --init-from) or {"model": name, "version": v} (a service job). None: fresh weights.
    init_from: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """A RunConfig stored by `to_dict`, checked again (ValueError if this library no longer takes it)."""
        try:
            model = _make(ModelConfig, values["model"])
            training = _make(TrainConfig, values["training"])
            preset = values["preset"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a stored run configuration ({type(e).__name__}: {e})") from None
        init_from = values.get("init_from")  # stored before fine-tuning came: none
        validate(model, training, init_from)
        return cls(preset, model, training, init_from)


def make_config(preset: str = "default", model: dict | None = None, training: dict | None = None,
                init_from: dict | None = None) -> RunConfig:
    """The preset's values, then the caller's (None values are ignored); ValueError names what is wrong."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    arch = _make(ModelConfig, {**chosen.model, **_given(model)}).arch
    method = _given(training).get("method", chosen.train.get("method", TrainConfig.method))
    model_values, train_values = chosen.values_for(arch, method)
    model_cfg = _make(ModelConfig, {**model_values, **_given(model)}).resolved()
    train_cfg = _make(TrainConfig, {**train_values, **_given(training)})
    validate(model_cfg, train_cfg, init_from)
    return RunConfig(preset, model_cfg, train_cfg, init_from)


# A job spec's `pipeline` section: its `mode` is TrainConfig.pipeline, the rest are TrainConfig's fields by name.
PIPELINE_SECTION = {"mode": "pipeline", "devices": "devices", "stages": "stages", "queue_depth": "queue_depth",
                    "stage_threads": "stage_threads", "stage_timeout": "stage_timeout"}


def from_spec(spec: dict, init_model: dict | None = None) -> RunConfig:
    """The RunConfig of a job spec `{"preset", "method", "model": {...}, "training": {...}, "pipeline": {...},
    "init_from": {...}, "train_components": [...]}` (every part optional): the one reading of that shape, for the
    command line, studies and the service. A spec with `init_from` (the lineage of a trained model) needs that
    model's config.json as `init_model`: the run keeps its architecture and method."""
    training = dict(spec.get("training") or {})
    if spec.get("method"):
        training["method"] = spec["method"]
    if spec.get("train_components") is not None:
        training["train_components"] = spec["train_components"]
    pipeline = {k: v for k, v in (spec.get("pipeline") or {}).items() if v is not None}
    unknown = sorted(set(pipeline) - set(PIPELINE_SECTION))
    if unknown:
        raise ValueError(f"unknown pipeline field(s): {', '.join(unknown)}")
    if pipeline.get("mode", "sequential") == "sequential":
        devices = pipeline.pop("devices", None)
        if set(pipeline) - {"mode"}:
            raise ValueError(f"pipeline {', '.join(sorted(set(pipeline) - {'mode'}))} apply to the threads and "
                             "processes modes only")
        if devices and len(devices) > 1:
            raise ValueError("sequential mode trains on one device; name one, or use mode threads or processes")
        if devices:
            if training.get("device", devices[0]) != devices[0]:
                raise ValueError("training.device and pipeline.devices disagree")
            training["device"] = devices[0]
    else:
        training.update({PIPELINE_SECTION[k]: v for k, v in pipeline.items()})
    model = spec.get("model")
    if spec.get("init_from") is not None:
        if init_model is None:  # a study's base, say: only a single run starts from a trained model
            raise ValueError("init_from: only a single run (al train --init-from, a job) starts from a trained model")
        model = _starting_architecture(init_model, model, training)
    return make_config(spec.get("preset") or "default", model, training, spec.get("init_from"))


def _starting_architecture(init_model: dict, model: dict | None, training: dict) -> dict:
    """The architecture of a run that starts from a trained model (its config.json `init_model`): the model's own,
    and its method (set in `training`); ValueError if the spec asks for others."""
    given = sorted(_given(model))
    if given:
        raise ValueError(f"a run that starts from a trained model (init_from) keeps its architecture: leave out "
                         f"model {', '.join(given)}")
    method = init_model["method"]
    if training.get("method") is None:
        training["method"] = method
    if training["method"] != method:
        raise ValueError(f"method: the model it starts from (init_from) was trained with {method}, and a run that "
                         f"starts from it trains with {method} too")
    return init_model["model"]


def _given(values: dict | None) -> dict:
    return {k: v for k, v in (values or {}).items() if v is not None}


def _make(cls, values: dict):
    unknown = sorted(set(values) - set(limits_of(cls)))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)


def check_limits(config) -> None:
    """Each field's value against its Limits (None: the per-architecture default or unset)."""
    for name, limits in limits_of(type(config)).items():
        value = getattr(config, name)
        if value is None:
            continue
        if limits.items is not None:
            low, high = limits.items
            if not isinstance(value, list) or not low <= len(value) <= high:
                raise ValueError(f"{name} must be a list of {low} to {high} values")
            for item in value:
                _check_value(name, item, limits)
        else:
            _check_value(name, value, limits)


def _check_value(name: str, value, limits: Limits) -> None:
    if limits.choices is not None and value not in limits.choices:
        raise ValueError(f"{name} must be one of {', '.join(limits.choices)}, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, holds, sign in ((limits.ge, operator.ge, ">="), (limits.gt, operator.gt, ">"),
                                   (limits.le, operator.le, "<="), (limits.lt, operator.lt, "<")):
            if bound is not None and not holds(value, bound):
                raise ValueError(f"{name} must be {sign} {bound:g}, got {value!r}")
    if limits.max_length is not None and len(value) > limits.max_length:
        raise ValueError(f"{name} must be at most {limits.max_length} characters")
    if limits.pattern is not None and not re.fullmatch(limits.pattern, value):
        raise ValueError(f"{name} {value!r} is not of the form {limits.pattern}")


def validate(model_cfg: ModelConfig, train_cfg: TrainConfig, init_from: dict | None = None) -> None:
    """Each field's limits, then what holds across fields."""
    check_limits(model_cfg)
    check_limits(train_cfg)
    if not model_cfg.widths:
        raise ValueError("widths must be a non-empty list of positive integers")
    if model_cfg.arch == "resnet" and len(model_cfg.widths) < 2:
        raise ValueError("resnet widths need the stem and at least one stage")
    check_conv_levers(model_cfg)
    if model_cfg.arch == "transformer" and model_cfg.embedding_dim % model_cfg.heads:
        raise ValueError(f"transformer: heads ({model_cfg.heads}) must divide embedding_dim "
                         f"({model_cfg.embedding_dim})")
    if train_cfg.pipeline != "sequential" and train_cfg.method != "al":
        raise ValueError("pipelining is for AL only: BP's backward pass locks every layer until the loss is known")
    if train_cfg.train_components is not None:
        check_train_components(train_cfg.train_components, component_count(model_cfg), train_cfg.method, init_from)


def check_train_components(components: list[int], depth: int, method: str, init_from: dict | None) -> None:
    if init_from is None:
        raise ValueError("train_components freezes the other components of a trained model: name the model to "
                         "start from (init_from)")
    if method != "al":
        raise ValueError("train_components is for AL: BP trains the whole network from one loss")
    outside = sorted({k for k in components if k > depth})
    if outside:
        raise ValueError(f"train_components {outside} out of range: the model has {depth} components, numbered "
                         f"1 to {depth}")
    if len(set(components)) != len(components):
        raise ValueError(f"train_components {components} names a component twice")


def component_count(model_cfg: ModelConfig) -> int:
    """L: one component per width (resnet: the stem shares the first stage's component)."""
    return len(model_cfg.widths) - (model_cfg.arch == "resnet")


def check_conv_levers(model_cfg: ModelConfig) -> None:
    if model_cfg.bridge_convs and model_cfg.arch not in ("cnn", "resnet"):
        raise ValueError("bridge_convs apply to conv maps: arch cnn or resnet")
    if model_cfg.target_widths is not None and len(model_cfg.target_widths) != component_count(model_cfg):
        raise ValueError(f"target_widths names {len(model_cfg.target_widths)} widths for "
                         f"{component_count(model_cfg)} components: one per component")
