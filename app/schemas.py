"""Request and response bodies of the HTTP API, with the limits that OpenAPI shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from al.config import ACTIVATIONS, ARCHS, H1_LOSSES, METHODS, PRESETS, SCHEDULES

MAX_EPOCHS = 1000
MAX_WIDTH = 8192
MAX_COMPONENTS = 32
MAX_BATCH_SIZE = 65536
MAX_PREDICT_ROWS = 4096
MAX_FEATURES = 1_000_000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

Activation = Literal[ACTIVATIONS]  # type: ignore[valid-type]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- datasets -------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    id: str = Field(description="use it as a job's `dataset`; built-in datasets have their name as id")
    name: str = Field(description="the uploaded file's name, or the built-in name")
    builtin: bool = Field(description="one of the library's datasets, not an upload")
    rows: int = Field(description="samples in the file (train and test together)")
    shape: list[int] = Field(description="shape of one sample, e.g. [64] for a table or [1, 28, 28] for images")
    features: int = Field(description="values per sample (the product of `shape`)")
    classes: list[Any] = Field(description="label values, sorted; the index is the class index")
    size_bytes: int | None = Field(None, description="size of the stored file")
    created_at: str | None = Field(None, description="upload time, ISO 8601 UTC")


class DatasetList(BaseModel):
    items: list[DatasetPublic] = Field(description="uploaded datasets, newest first")
    total: int = Field(description="uploaded datasets in all")
    limit: int
    offset: int
    builtin: list[str] = Field(description="names of the built-in datasets, usable as dataset ids")


# --- jobs -----------------------------------------------------------------------------


class ModelSpec(Strict):
    """The network; every field left out takes the preset's value (see al/config.py)."""

    arch: Literal[ARCHS] | None = Field(None, description="mlp | cnn | resnet")  # type: ignore[valid-type]
    widths: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_COMPONENTS,
        description="mlp: width of each component's encoder; cnn: channels per block; resnet: stem then stages",
    )
    target_width: int | None = Field(None, ge=1, le=MAX_WIDTH, description="n, the width of the label codes t_i")
    encoder_activation: Activation | None = Field(None, description="activation of the encoders f_i")
    bridge_activation: Activation | None = Field(None, description="activation of the bridges b_i")
    target_activation: Activation | None = Field(None, description="activation of g_i and h_i (i > 1)")
    bridge_hidden_factor: int | None = Field(None, ge=1, le=64, description="hidden bridge layer is factor * n wide")
    bridge_depth: int | None = Field(None, ge=1, le=16, description="dense layers in each bridge")
    bridge_pool: int | None = Field(None, ge=1, le=64, description="conv maps: adaptive-average-pool to PxP before b_i")
    h1_loss: Literal[H1_LOSSES] | None = Field(None, description="loss of h_1 against the label: mse | ce")  # type: ignore[valid-type]


class TrainingSpec(Strict):
    """Optimisation; every field left out takes the preset's value."""

    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS, description="passes over the training split")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH_SIZE, description="samples per step")
    lr: float | None = Field(None, gt=0, le=10, allow_inf_nan=False, description="learning rate of f and b")
    target_lr_factor: float | None = Field(
        None, gt=0, le=100, allow_inf_nan=False, description="g and h learn at lr * factor"
    )
    associated_weight: float | None = Field(
        None, ge=0, le=1e6, allow_inf_nan=False, description="weight of the associated losses"
    )
    autoencoder_weight: float | None = Field(
        None, ge=0, le=1e6, allow_inf_nan=False, description="weight of the autoencoder losses"
    )
    detach_target: bool | None = Field(None, description="stop the gradient of t_i in the associated loss")
    schedule: Literal[SCHEDULES] | None = Field(None, description="learning-rate schedule: step | cosine | none")  # type: ignore[valid-type]
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seeds initialisation and batch order")
    val_fraction: float | None = Field(
        None, ge=0, lt=1, description="share of the training split held out for validation"
    )
    device: str | None = Field(
        None,
        max_length=32,
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="auto (CUDA if the worker has it), cpu, cuda, cuda:N",
    )


class PipelineSpec(Strict):
    mode: Literal["sequential"] = Field("sequential", description="sequential: all components on one device")
    devices: list[Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]] | None = Field(
        None, min_length=1, max_length=1, description="the device to train on (one entry in sequential mode)"
    )


class JobCreate(Strict):
    dataset: str = Field(
        min_length=1, max_length=64, description="a built-in name (digits, mnist, ...) or an uploaded dataset's id"
    )
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="model name to register on success (default: the job id)"
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="architecture fields")
    method: Literal[METHODS] = Field("al", description="al (associated learning) | bp (end-to-end backpropagation)")  # type: ignore[valid-type]
    preset: Literal[tuple(PRESETS)] = Field("default", description="named defaults: paper (R1 as published) | default")  # type: ignore[valid-type]
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="optimisation fields")
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec, description="where the components run")


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]


class Progress(BaseModel):
    epoch: int = Field(description="epochs completed")
    epochs: int = Field(description="epochs to train")
    step: int = Field(description="steps done in the current epoch")
    steps: int | None = Field(description="steps per epoch (known once training started)")


class ModelRef(BaseModel):
    name: str
    version: int


class JobPublic(BaseModel):
    id: str
    name: str = Field(description="the model name this job registers")
    status: JobStatus = Field(description="queued | running | succeeded | failed | cancelling | cancelled")
    dataset: str
    spec: dict = Field(description="the job spec as submitted")
    progress: Progress
    metrics: dict | None = Field(
        description="latest epoch's losses per component and accuracies; test accuracy when done"
    )
    error: str | None = Field(description="why the job failed")
    attempts: int = Field(description="times a worker started this job (more than 1 after a worker died)")
    resumed_from_epoch: int | None = Field(description="the checkpoint's epoch the latest attempt resumed from")
    created_at: str
    started_at: str | None
    finished_at: str | None
    model: ModelRef | None = Field(description="the registered model, once succeeded")


class JobList(BaseModel):
    items: list[JobPublic] = Field(description="newest first")
    total: int
    limit: int
    offset: int


class JobMetrics(BaseModel):
    job_id: str
    epochs: list[dict] = Field(description="one entry per completed epoch, in order")


# --- models and prediction ----------------------------------------------------------------


class ModelVersionPublic(BaseModel):
    name: str
    version: int
    job_id: str
    created_at: str
    input_shape: list[int]
    features: int
    classes: list[Any]
    depth: int = Field(description="components; predict's `depth` may be 1..depth")
    method: str
    test_accuracy: float | None


class ModelPublic(BaseModel):
    name: str
    latest: int = Field(description="the version predict uses when none is named")
    versions: list[ModelVersionPublic]


class PredictRequest(Strict):
    inputs: list[Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_FEATURES)]] = Field(
        min_length=1,
        max_length=MAX_PREDICT_ROWS,
        description="rows of raw (un-normalised) features, one row per sample",
    )
    depth: int | None = Field(
        None, ge=1, le=MAX_COMPONENTS, description="shortcut inference at this depth (default: all)"
    )


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="the predicted class value of each row")
    probabilities: list[list[float]] = Field(description="per row, the probability of each class in `classes` order")
    model: str
    version: int


# --- Open Inference Protocol v2 -----------------------------------------------------------

V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]


class V2Tensor(BaseModel):
    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0, le=MAX_PREDICT_ROWS * MAX_FEATURES)]] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    data: list[Any] = Field(description="row-major, flat or nested")
    parameters: dict[str, Any] | None = None


class V2InferInput(V2Tensor):
    datatype: V2Datatype = Field(description="numeric Open Inference Protocol datatype")
    shape: list[Annotated[int, Field(ge=1, le=MAX_FEATURES)]] = Field(
        min_length=2, max_length=5, description="[rows, features] or [rows, *input_shape]"
    )


class V2RequestedOutput(BaseModel):
    name: str = Field(max_length=256, description="predictions | probabilities")
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = Field(None, description='{"depth": k} for shortcut inference')
    inputs: list[V2InferInput] = Field(min_length=1, max_length=1, description="one input tensor")
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=2, description="default: both outputs")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Error(BaseModel):
    error: str
