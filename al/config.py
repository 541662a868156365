"""Configuration of an AL network and its training, and the named presets.

Every choice the reference code (R1) hard-codes is a field here; the `paper`
preset holds R1's values, listed in README.md ("Presets").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHS = ("mlp", "cnn", "resnet")
METHODS = ("al", "bp")
ACTIVATIONS = ("elu", "relu", "sigmoid", "tanh", "identity")
SCHEDULES = ("step", "cosine", "none")
PIPELINES = ("sequential", "threads", "processes")
H1_LOSSES = ("mse", "ce")


@dataclass
class ModelConfig:
    arch: str = "mlp"
    # mlp: width of each component's encoder; cnn: channels of each conv block;
    # resnet: channels of the stem and of each stage (first entry = stem).
    widths: list[int] | None = None
    target_width: int | None = None  # n, the width of t_i (None: per arch)
    encoder_activation: str = "elu"
    bridge_activation: str = "sigmoid"
    target_activation: str = "sigmoid"  # g_i and h_i (i > 1)
    bridge_hidden_factor: int = 5  # hidden bridge layer is factor * n wide
    bridge_depth: int = 2  # dense layers in b_i
    bridge_pool: int | None = None  # conv maps: adaptive-avg-pool to PxP before b_i
    h1_loss: str = "mse"  # loss of the decoder h_1 against the label: mse (one-hot) | ce

    def resolved(self) -> ModelConfig:
        """Fill the per-architecture defaults."""
        defaults = {
            "mlp": ([512, 512], 512),
            "cnn": ([32, 64, 128, 256], 256),
            "resnet": ([16, 16, 32, 64], 256),
        }
        if self.arch not in defaults:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        widths, target_width = defaults[self.arch]
        return dataclasses.replace(
            self,
            widths=list(self.widths or widths),
            target_width=self.target_width or target_width,
        )


@dataclass
class TrainConfig:
    method: str = "al"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-4  # encoder side (f, b); BP uses it for the whole net
    target_lr_factor: float = 2.0  # target side (g, h) learns at lr * factor
    associated_weight: float = 1.0
    autoencoder_weight: float = 1.0
    detach_target: bool = True  # sg(t_i) in the associated loss; False can collapse t_i
    schedule: str = "step"
    seed: int = 0
    val_fraction: float = 0.1
    device: str = "auto"
    # Pipelined AL (spec section 4, al/pipeline/): stages of consecutive components train at once.
    pipeline: str = "sequential"  # sequential | threads | processes
    devices: list[str] | None = None  # one per stage, e.g. ["cpu", "cpu"]; None: the cores or GPUs, up to the depth
    stages: str | None = None  # components per stage, e.g. "0-1,2-3"; None: balanced by measured time
    queue_depth: int = 2  # mini-batches that may wait between two stages
    stage_threads: int | None = None  # CPU intra-op threads per stage; None: the cores shared out
    stage_timeout: float = 300.0  # seconds any stage waits for a message before the run fails


@dataclass
class Preset:
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # R1 as published.
    "paper": Preset(),
    # R1 with a 10x learning rate and a cosine schedule: R1's step schedule was
    # tuned for 200 epochs; over tens of epochs it cuts the rate too early.
    # `al bench accuracy` backs this choice (docs/benchmarks.md).
    "default": Preset(train={"lr": 1e-3, "schedule": "cosine"}),
    # Lean and quick to start: one-layer bridges (R1's two-layer 5n bridges are most of an MLP's
    # FLOPs), tanh codes and bridges, with which AL learns from its first epoch where sigmoid codes
    # sit near chance for one or two, and ReLU encoders. `al bench time-to-accuracy` measures it.
    "lean": Preset(model={"bridge_depth": 1, "target_activation": "tanh", "bridge_activation": "tanh",
                          "encoder_activation": "relu"},
                   train={"lr": 2e-3, "schedule": "cosine"}),
}


def build_configs(
    preset: str = "default",
    model_overrides: dict | None = None,
    train_overrides: dict | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The preset's values, then the caller's overrides (None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    model_values = {**chosen.model, **_given(model_overrides)}
    train_values = {**chosen.train, **_given(train_overrides)}
    model_cfg = _make(ModelConfig, model_values).resolved()
    train_cfg = _make(TrainConfig, train_values)
    validate(model_cfg, train_cfg)
    return model_cfg, train_cfg


def _given(values: dict | None) -> dict:
    return {k: v for k, v in (values or {}).items() if v is not None}


def _make(cls, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)


def validate(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    def choice(name, value, allowed):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    choice("arch", model_cfg.arch, ARCHS)
    choice("method", train_cfg.method, METHODS)
    choice("schedule", train_cfg.schedule, SCHEDULES)
    choice("h1_loss", model_cfg.h1_loss, H1_LOSSES)
    for name in ("encoder_activation", "bridge_activation", "target_activation"):
        choice(name, getattr(model_cfg, name), ACTIVATIONS)
    if not model_cfg.widths or any(w < 1 for w in model_cfg.widths):
        raise ValueError("widths must be a non-empty list of positive integers")
    if model_cfg.arch == "resnet" and len(model_cfg.widths) < 2:
        raise ValueError("resnet widths need the stem and at least one stage")
    if model_cfg.target_width < 1 or model_cfg.bridge_hidden_factor < 1 or model_cfg.bridge_depth < 1:
        raise ValueError("target_width, bridge_hidden_factor and bridge_depth must be >= 1")
    if model_cfg.bridge_pool is not None and model_cfg.bridge_pool < 1:
        raise ValueError("bridge_pool must be >= 1 or unset")
    if train_cfg.epochs < 1 or train_cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if not train_cfg.lr > 0 or not train_cfg.target_lr_factor > 0:
        raise ValueError("lr and target_lr_factor must be > 0")
    if not 0 <= train_cfg.val_fraction < 1:
        raise ValueError("val_fraction must be in [0, 1)")
    choice("pipeline", train_cfg.pipeline, PIPELINES)
    if train_cfg.pipeline != "sequential" and train_cfg.method != "al":
        raise ValueError("pipelining is for AL only: BP's backward pass locks every layer until the loss is known")
    if train_cfg.queue_depth < 1 or (train_cfg.stage_threads is not None and train_cfg.stage_threads < 1):
        raise ValueError("queue_depth and stage_threads must be >= 1")
    if not train_cfg.stage_timeout > 0:
        raise ValueError("stage_timeout must be > 0")
