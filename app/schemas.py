"""Request and response bodies of the HTTP API, with the limits that OpenAPI shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from al.config import MAX_COMPONENTS, TrainConfig, limits_of
from al.study import OBJECTIVES, PARETO_OBJECTIVES
from service.jobspec import DATASET_DESCRIPTION, ModelAndTraining, Strict

MAX_PREDICT_ROWS = 4096
MAX_EPOCHS = int(limits_of(TrainConfig)["epochs"].le)
MAX_FEATURES = 1_000_000
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


PAGE_LIMIT = "page size"
PAGE_OFFSET = "items skipped"


# --- datasets -------------------------------------------------------------------------


class DatasetPublic(BaseModel):
    id: str = Field(description="use it as a job's `dataset`; built-in datasets have their name as id")
    name: str = Field(description="the uploaded file's name, or the built-in name")
    builtin: bool = Field(description="one of the library's datasets, not an upload")
    input_kind: Literal["tensor", "text"] = Field("tensor", description="tensor: samples of numbers; text: a CSV's "
                                                  "`text` column (train it with arch lstm or transformer)")
    rows: int = Field(description="samples in the file (train and test together)")
    shape: list[int] = Field(description="shape of one sample, e.g. [64] for a table or [1, 28, 28] for images; "
                             "[] for texts")
    features: int = Field(description="values per sample (the product of `shape`; 1 for texts: one string each)")
    classes: list[Any] = Field(description="label values, sorted; the index is the class index")
    size_bytes: int | None = Field(None, description="size of the stored file")
    created_at: str | None = Field(None, description="upload time, ISO 8601 UTC")


class DatasetList(BaseModel):
    items: list[DatasetPublic] = Field(description="uploaded datasets, newest first")
    total: int = Field(description="uploaded datasets in all")
    limit: int = Field(description=PAGE_LIMIT)
    offset: int = Field(description=PAGE_OFFSET)
    builtin: list[str] = Field(description="names of the built-in datasets, usable as dataset ids")


# --- jobs (the body of POST /v1/jobs, JobCreate, is service/jobspec.py's) ------------------------------


JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled", "pruned"]


class Progress(BaseModel):
    epoch: int = Field(description="epochs completed")
    epochs: int = Field(description="epochs to train")
    step: int = Field(description="steps done in the current epoch")
    steps: int | None = Field(description="steps per epoch (known once training started)")


class ModelRef(BaseModel):
    name: str = Field(description="registered model name")
    version: int = Field(description="version of that name, counting from 1")


class JobPublic(BaseModel):
    id: str = Field(description="the job id; GET /v1/jobs/{id}")
    name: str = Field(description="the model name this job registers")
    status: JobStatus = Field(description="queued | running | succeeded | failed | cancelling | cancelled | pruned "
                              "(a study's trial that its pruner stopped early)")
    dataset: str = Field(description="the dataset id or built-in name it trains on")
    spec: dict = Field(description="the job spec as submitted")
    progress: Progress = Field(description="how far training is")
    metrics: dict | None = Field(
        description="latest epoch's losses per component and accuracies; test accuracy when done"
    )
    error: str | None = Field(description="why the job failed (or, for a study's trial, was pruned)")
    waiting: str | None = Field(description="why a queued job is not running yet (a pipeline job waits for "
                                "enough workers)")
    attempts: int = Field(description="times a worker started this job (more than 1 after a worker died)")
    resumed_from_epoch: int | None = Field(description="the checkpoint's epoch the latest attempt resumed from")
    created_at: str = Field(description="submission time, ISO 8601 UTC")
    started_at: str | None = Field(description="when a worker first took it")
    finished_at: str | None = Field(description="when it reached succeeded, failed or cancelled")
    model: ModelRef | None = Field(description="the registered model, once succeeded")


class JobList(BaseModel):
    items: list[JobPublic] = Field(description="newest first")
    total: int = Field(description="jobs matching the filter in all")
    limit: int = Field(description=PAGE_LIMIT)
    offset: int = Field(description=PAGE_OFFSET)


class JobMetrics(BaseModel):
    job_id: str = Field(description="the job")
    epochs: list[dict] = Field(description="one entry per completed epoch, in order")


# --- studies ----------------------------------------------------------------------------

StudyStatus = Literal["running", "cancelling", "succeeded", "failed", "cancelled"]
SearchChoice = str | bool | int | float


class SearchParam(Strict):
    """One switch's range: {"type": "float"|"int", "low", "high", "log"?} or {"type": "categorical", "choices"}."""

    type: Literal["float", "int", "categorical"] = Field(description="float | int (a range) | categorical (choices)")
    low: int | float | None = Field(None, allow_inf_nan=False, description="float, int: the lowest value")
    high: int | float | None = Field(None, allow_inf_nan=False, description="float, int: the highest value")
    log: bool | None = Field(None, description="float, int: sample on a log scale (low > 0)")
    choices: list[SearchChoice] | None = Field(None, min_length=1, max_length=64, description="categorical: the values")


class PrunerSpec(Strict):
    type: Literal["median", "none"] = Field("median", description="median: stop a trial whose validation accuracy "
                                            "at an epoch's end is below the median of earlier trials at that epoch "
                                            "(time_to_accuracy: one that has trained as long as the quickest trial "
                                            "took to reach the target)")
    startup_trials: int = Field(3, ge=0, le=1000, description="trials that complete before any is pruned")
    warmup_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="epochs of each trial before it may be pruned")


class StudyCreate(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$",
                      description="the best trial's model is registered under this name")
    dataset: str = Field(min_length=1, max_length=64, description=DATASET_DESCRIPTION)
    base: ModelAndTraining = Field(default_factory=ModelAndTraining, description="what every trial starts from")
    space: dict[str, SearchParam] = Field(
        min_length=1, max_length=16,
        description="dotted paths into the job spec (training.lr, model.encoder_activation, ...) and their ranges",
    )
    trials: int = Field(ge=1, le=1000, description="trials in all")
    parallel: int = Field(1, ge=1, le=64, description="trials that train at once")
    objective: Literal[OBJECTIVES] | None = Field(
        None, description="val_accuracy (the default): the last epoch's, maximised; time_to_accuracy: the train "
        "seconds until the validation accuracy first reaches `target`, minimised (the run stops there; a trial that "
        "never reaches it ranks below every one that did, by its accuracy)")
    target: float | None = Field(None, gt=0, le=1, description="time_to_accuracy: the validation accuracy to reach")
    objectives: list[Literal[PARETO_OBJECTIVES]] | None = Field(
        None, description='["val_accuracy", "train_seconds"]: a Pareto front (`pareto` in the answer) instead of '
        "one objective; the front's most accurate trial is registered; nothing is pruned")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="stops bad trials at an epoch's end")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seeds the sampler (default: a random seed)")


class StudyTrial(BaseModel):
    number: int = Field(description="the trial's number, from 0")
    state: Literal["running", "complete", "pruned", "fail", "waiting"] = Field(description="Optuna's trial state")
    params: dict[str, Any] = Field(description="the value of each searched switch")
    value: float | None = Field(description="the objective, once complete (none for a Pareto study)")
    values: list[float] | None = Field(None, description="every objective's value, once complete (a Pareto study: "
                                       "validation accuracy, train seconds)")
    epochs_reported: int = Field(description="epochs whose validation accuracy the pruner has seen")
    job_id: str | None = Field(description="the training job of this trial: GET /v1/jobs/{id}")
    job_status: JobStatus | None = Field(description="that job's status")
    result: dict | None = Field(description="that job's result")
    model: ModelRef | None = Field(description="the model registered from this trial (the best ones)")


class StudyPublic(BaseModel):
    id: str = Field(description="the study id; GET /v1/studies/{id}")
    name: str = Field(description="the best trial's model is registered under this name")
    status: StudyStatus = Field(description="running | cancelling | succeeded | failed | cancelled")
    error: str | None = Field(description="why the study failed")
    spec: dict = Field(description="the study as submitted")
    trials: list[StudyTrial] = Field(description="trials asked so far, in order")
    best: StudyTrial | None = Field(description="the complete trial with the best objective so far (of a Pareto "
                                   "front, the most accurate)")
    pareto: list[StudyTrial] | None = Field(None, description="a Pareto study's front so far: no trial is both "
                                            "more accurate and quicker than any of these")
    importances: dict[str, float] | None = Field(
        description="importance of each switch (Optuna's default evaluator; sums to 1), once 4 trials are "
        "complete; only on GET of one study"
    )
    created_at: str = Field(description="submission time, ISO 8601 UTC")
    finished_at: str | None = Field(description="when it ended")


class StudyList(BaseModel):
    items: list[StudyPublic] = Field(description="newest first")
    total: int = Field(description="studies in all")
    limit: int = Field(description=PAGE_LIMIT)
    offset: int = Field(description=PAGE_OFFSET)


# --- models and prediction ----------------------------------------------------------------


class ModelVersionPublic(BaseModel):
    name: str = Field(description="registered model name")
    version: int = Field(description="version of that name, counting from 1")
    job_id: str = Field(description="the job that trained it")
    created_at: str = Field(description="registration time, ISO 8601 UTC")
    available: bool = Field(description="its files can be read; if not, `error` says why and predict answers 503")
    error: str | None = Field(None, description="why the version cannot be used")
    input_shape: list[int] | None = Field(None, description="shape of one sample; predict takes rows of this "
                                          "shape or flat rows of `features` values")
    features: int | None = Field(None, description="values per input row")
    input_kind: Literal["tensor", "text"] | None = Field(None, description="tensor: predict takes rows of numbers; "
                                                         "text: one string per row (input_shape is [max_tokens], "
                                                         "the tokens it reads of each)")
    classes: list[Any] | None = Field(None, description="class values, in the order of `probabilities`")
    depth: int | None = Field(None, description="components; predict's `depth` may be 1..depth")
    method: str | None = Field(None, description="al | bp")
    parameters: int | None = Field(None, description="trainable and buffer values in its weights")
    test_accuracy: float | None = Field(None, description="accuracy on the dataset's test split after the last "
                                        "epoch")
    init_from: dict | None = Field(None, description="its lineage: the version it was fine-tuned from "
                                   "({\"model\", \"version\"}, and the \"alias\" the job named it by, if any; a "
                                   "model trained with al train --init-from: {\"directory\"}), none if it was "
                                   "trained from fresh weights")
    train_components: list[int] | None = Field(None, description="fine-tuned: the components that trained (the "
                                               "others kept the weights of init_from); none: all")


class AliasPublic(BaseModel):
    name: str = Field(description="registered model name")
    alias: str = Field(description="the alias: predict with POST /v1/models/{name}/aliases/{alias}/predict, or in "
                       "place of a version in v2 paths; `default` answers the requests that name no version")
    versions: dict[str, float] = Field(description="the versions it points to, each with its share of the "
                                       "requests (1 for one version), the largest share first")
    updated_at: str = Field(description="when it was last pointed, ISO 8601 UTC")


MAX_SPLIT = 8  # versions in one alias


class AliasSet(Strict):
    """Where an alias points: one version, or a split of the requests between versions by share (a canary)."""

    version: int | None = Field(None, ge=1, le=2**31 - 1, description="the version it points to")
    versions: dict[Annotated[str, Field(pattern=r"^[1-9][0-9]{0,8}$")],
                   Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] | None = Field(
        None, min_length=1, max_length=MAX_SPLIT,
        description='a split: each version\'s share of the requests, e.g. {"3": 0.9, "4": 0.1}; shares above 0 '
        "that sum to 1; the versions must take the same input and answer the same classes")

    @model_validator(mode="after")
    def _one_target(self) -> AliasSet:
        if (self.version is None) == (self.versions is None):
            raise ValueError('give "version" (one version) or "versions" (shares of the requests), one of the two')
        total = sum((self.versions or {}).values())
        if self.versions and abs(total - 1) > 1e-6:
            raise ValueError(f"the shares in versions sum to {total:g}; they must sum to 1")
        return self

    def shares(self) -> dict[int, float]:
        return {self.version: 1.0} if self.versions is None else {int(v): w for v, w in self.versions.items()}


class ModelPublic(BaseModel):
    name: str = Field(description="registered model name")
    latest: int = Field(description="the newest version; predict uses it when none is named and the alias "
                        "`default` is not set")
    aliases: list[AliasPublic] = Field(description="its aliases, by alias")
    versions: list[ModelVersionPublic] = Field(description="every version, oldest first")


Values = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_FEATURES)]
# One sample: its features flat, or nested in the model's input shape (e.g. 28 lists of 28 for [1, 28, 28]
# images uploaded as (N, 28, 28)); up to the 3 dimensions of (C, H, W).
Sample = Values | Annotated[list[Values], Field(min_length=1)] | Annotated[list[list[Values]], Field(min_length=1)]


class PredictRequest(Strict):
    inputs: list[Sample] | list[str] = Field(
        min_length=1,
        max_length=MAX_PREDICT_ROWS,
        description="raw (un-normalised) samples, one per row: flat (the model's `features` values) or nested "
        "in its `input_shape`; for a text model (input_kind text), one string per row, of any length (the model "
        "reads its first max_tokens tokens; the request's size is bounded by AL_MAX_REQUEST_BYTES)",
    )
    depth: int | None = Field(
        None, ge=1, le=MAX_COMPONENTS, description="shortcut inference at this depth (default: all)"
    )
    exit_confidence: float | None = Field(
        None, ge=0, le=1, allow_inf_nan=False,
        description="early exit: each row stops at the first depth (up to `depth`) whose top probability "
        "reaches this (default: none, every row takes the full path)",
    )


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="per row, the predicted class: its index in `classes` where the "
                                   "classes have names (`labels`), else its value")
    labels: list[str] | None = Field(None, description="per row, the name of the predicted class; only for a model "
                                     "whose classes have names (e.g. a text model's)")
    probabilities: list[list[float]] = Field(description="per row, the probability of each class in `classes` order")
    depths: list[int] = Field(description="per row, the depth k of the path that answered it")
    model: str = Field(description="the model's name")
    version: int = Field(description="the version that answered")


# --- Open Inference Protocol v2 -----------------------------------------------------------

V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]


class V2Tensor(BaseModel):
    name: str = Field(max_length=256, description="tensor name")
    shape: list[Annotated[int, Field(ge=0, le=MAX_PREDICT_ROWS * MAX_FEATURES)]] = Field(
        max_length=8, description="dimensions"
    )
    datatype: str = Field(max_length=16, description="Open Inference Protocol datatype, e.g. FP32, INT64, BYTES")
    data: list[Any] = Field(description="row-major, flat or nested")
    parameters: dict[str, Any] | None = Field(None, description="unused")


class V2InferInput(V2Tensor):
    name: str = Field(max_length=256, description="any name; the model has one input")
    datatype: V2Datatype = Field(description="a numeric Open Inference Protocol datatype; BYTES (UTF-8 strings) "
                                 "for a text model")
    shape: list[Annotated[int, Field(ge=1, le=MAX_FEATURES)]] = Field(
        min_length=1, max_length=5, description=f"[rows, features] or [rows, *input_shape]; [rows] of BYTES for a "
        f"text model; at most {MAX_PREDICT_ROWS} rows, as the native predict"
    )
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when the values follow "
                                   "the JSON in binary (parameters.binary_data_size, Triton's extension)")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the bytes of the values in "
                                              "binary after the JSON")

    @field_validator("shape")
    @classmethod
    def _rows_within_limit(cls, shape: list[int]) -> list[int]:
        if shape and shape[0] > MAX_PREDICT_ROWS:
            raise ValueError(f"{shape[0]} rows; at most {MAX_PREDICT_ROWS} per request")
        return shape

    @model_validator(mode="after")
    def _shape_fits_datatype(self) -> V2InferInput:
        if self.datatype == "BYTES" and len(self.shape) != 1:
            raise ValueError(f"a BYTES input (texts) has shape [rows], got {self.shape}")
        if self.datatype != "BYTES" and len(self.shape) < 2:
            raise ValueError(f"a {self.datatype} input has shape [rows, features] or [rows, *input_shape], "
                             f"got {self.shape}")
        return self


class V2RequestedOutput(BaseModel):
    name: str = Field(max_length=256, description="predictions | labels | probabilities | depths")
    parameters: dict[str, Any] | None = Field(None, description="unused")


class V2InferRequest(BaseModel):
    id: str | None = Field(None, max_length=256, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(
        None, description='{"depth": k} for shortcut inference, {"exit_confidence": c} (0..1) for early exit'
    )
    inputs: list[V2InferInput] = Field(min_length=1, max_length=1, description="one input tensor")
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=4, description="default: every output")


class V2InferResponse(BaseModel):
    model_name: str = Field(description="the model's name")
    model_version: str | None = Field(None, description="the version that answered")
    id: str | None = Field(None, description="the request's id")
    parameters: dict[str, Any] | None = Field(None, description="unused")
    outputs: list[V2Tensor] = Field(
        description="predictions [rows] (class values; class indices where the classes have names), labels [rows] "
        "(BYTES, the class names; only where the classes have names), probabilities [rows, classes], depths [rows] "
        "(depth used)"
    )


class V2TensorMetadata(BaseModel):
    name: str = Field(description="tensor name")
    datatype: str = Field(description="Open Inference Protocol datatype")
    shape: list[int] = Field(description="dimensions; -1 for any number of rows")


class V2ModelMetadata(BaseModel):
    name: str = Field(description="the model's name")
    versions: list[str] = Field(description="its versions")
    platform: str = Field(description="what runs it")
    inputs: list[V2TensorMetadata] = Field(description="the one input: raw features per row")
    outputs: list[V2TensorMetadata] = Field(description="predictions, probabilities and depths")


class V2ServerMetadata(BaseModel):
    name: str = Field(description="server name")
    version: str = Field(description="server version")
    extensions: list[str] = Field(description="protocol extensions supported (none)")


class V2Error(BaseModel):
    error: str = Field(description="what is wrong with the request")
