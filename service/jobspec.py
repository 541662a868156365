"""The job spec, owned here: its HTTP schema (JobCreate, the body of POST /v1/jobs), derived from the
library's config fields (al/config.py), and `resolve`, which turns a spec into the RunConfig a job trains
with. The API resolves a spec once, when the job is submitted (and a study's base and trials when it is
created); the store keeps the RunConfig, and the worker trains with it as stored.

A job spec: `{"preset", "method", "model": {ModelConfig fields}, "training": {TrainConfig fields but the
pipeline's}, "pipeline": {"mode", "devices", "stages", ..., "workers"}}`; a field left out takes the preset's
value. A job that fine-tunes a registered version adds `"init_from": {"model", "version" | "alias"}` and may add
`"train_components"` (TrainConfig's field); it keeps that version's architecture and method.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from al.config import (
    METHODS,
    PIPELINE_SECTION,
    PRESETS,
    TEXT_ARCHS,
    Limits,
    ModelConfig,
    RunConfig,
    TrainConfig,
    from_spec,
    limits_of,
    value_type,
)
from al.data import TENSOR, TEXT
from al.model import count_parameters
from service.artifacts import MAX_VERSION

# TrainConfig fields that a job spec holds elsewhere: the method and the components to fine-tune at its top, the
# placement under `pipeline`.
NOT_IN_TRAINING = {"method", "train_components", *PIPELINE_SECTION.values()} - {"device"}
MAX_WORKERS = 32
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a job's model name
DATASET_DESCRIPTION = "a built-in name (digits, mnist, ...) or an uploaded dataset's id"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _pydantic_type(kind, limits: Limits):
    """The annotation that checks a value of `kind` against `limits`, as the HTTP schema shows it."""
    if limits.choices is not None:
        return Literal[limits.choices]
    bounds = {k: getattr(limits, k) for k in ("ge", "gt", "le", "lt", "pattern", "max_length")
              if getattr(limits, k) is not None}
    if kind is float:
        bounds["allow_inf_nan"] = False
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return Annotated[list[Annotated[item, Field(**bounds)]], Field(min_length=limits.items[0],
                                                                       max_length=limits.items[1])]
    return Annotated[kind, Field(**bounds)] if bounds else kind


def section_model(name: str, cls, fields: dict[str, str], doc: str, **extra) -> type[BaseModel]:
    """A pydantic model of the `cls` fields named in `fields` (spec name -> field name), each optional."""
    limits = limits_of(cls)
    declared = {spec_name: (_pydantic_type(value_type(cls, field), limits[field]) | None,
                            Field(None, description=limits[field].doc))
                for spec_name, field in fields.items()}
    return create_model(name, __base__=Strict, __doc__=doc, **declared, **extra)


ModelSpec = section_model("ModelSpec", ModelConfig, {name: name for name in limits_of(ModelConfig)},
                          "The network; every field left out takes the preset's value (al/config.py).")
TrainingSpec = section_model(
    "TrainingSpec", TrainConfig, {n: n for n in limits_of(TrainConfig) if n not in NOT_IN_TRAINING},
    "Optimisation; every field left out takes the preset's value.")
PipelineSpec = section_model(
    "PipelineSpec", TrainConfig, {k: v for k, v in PIPELINE_SECTION.items() if k != "mode"},
    "Where the components train: all on one device, or as pipeline stages (al/pipeline/).",
    mode=(Literal[limits_of(TrainConfig)["pipeline"].choices], Field(
        "sequential", description=limits_of(TrainConfig)["pipeline"].doc)),
    workers=(int | None, Field(None, ge=1, le=MAX_WORKERS, description=(
        "processes mode: run stage k in the k-th of this many workers, on any hosts, instead of in processes "
        "on one worker's host"))),
)


class ModelAndTraining(Strict):
    """What a model learns and how: a job spec's model, method, preset and training (a study's base)."""

    model: ModelSpec = Field(default_factory=ModelSpec, description="architecture fields")
    method: Literal[METHODS] = Field("al", description=limits_of(TrainConfig)["method"].doc)
    preset: Literal[tuple(PRESETS)] = Field("default", description="named defaults: " + " | ".join(PRESETS))
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="optimisation fields")


class JobSpec(ModelAndTraining):
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec, description="where the components run")


class InitFrom(Strict):
    """A registered version of the caller's tenant: by its number, or by an alias that points at one."""

    model: str = Field(pattern=NAME_PATTERN, description="the registered model's name")
    version: int | None = Field(None, ge=1, le=MAX_VERSION, description="its version")
    alias: str | None = Field(None, pattern=NAME_PATTERN, description="an alias of the model (e.g. default), in "
                              "place of the version")

    @model_validator(mode="after")
    def _version_or_alias(self) -> InitFrom:
        if (self.version is None) == (self.alias is None):
            raise ValueError("init_from names the model's version or an alias: one of the two")
        return self


TRAIN_COMPONENTS = limits_of(TrainConfig)["train_components"]


class JobCreate(JobSpec):
    """A training job (POST /v1/jobs): what it trains on, the name its model is registered under, and its
    job spec; a fine-tuning job, the registered version it starts from."""

    dataset: str = Field(min_length=1, max_length=64, description=DATASET_DESCRIPTION)
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="model name to register on success (default: the job id)"
    )
    init_from: InitFrom | None = Field(None, description=(
        "fine-tuning: start from this registered version's weights, with its architecture, method and input "
        "normalisation, on a dataset of the same input shape and classes; the new version's metadata names it"))
    train_components: _pydantic_type(value_type(TrainConfig, "train_components"), TRAIN_COMPONENTS) | None = Field(
        None, description=TRAIN_COMPONENTS.doc)


@dataclass
class StartingVersion:
    """The registered version a fine-tuning job starts from, as the API found it for the job's init_from."""

    lineage: dict  # the new version's init_from: {"model", "version"}, and the "alias" that named it, if one did
    config: dict  # its config.json


@dataclass
class Resolved:
    """A checked job spec: what it trains, and on how many workers."""

    config: RunConfig
    workers: int  # one per stage of a `processes` pipeline over several workers; 1 otherwise


def resolve(spec: ModelAndTraining | dict, start: StartingVersion | None = None) -> Resolved:
    """The job spec checked field by field (the schema) and across fields (the library); ValueError names the
    problem. Pass the validated model when FastAPI has made it already; a spec with `init_from` needs the version
    it names as `start`."""
    if isinstance(spec, dict):
        try:
            spec = JobSpec.model_validate(spec)
        except ValidationError as e:
            raise ValueError("; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
                                       for error in e.errors()[:3])) from None
    values = spec.model_dump(exclude_none=True)
    if "init_from" in values:
        values["init_from"] = start.lineage
        if "method" not in spec.model_fields_set:
            values.pop("method")  # the default is the version's own method, not the schema's
    pipeline = values.get("pipeline") or {}
    workers = pipeline.pop("workers", None)
    if workers is not None and pipeline.get("mode") != "processes":
        raise ValueError("pipeline.workers applies to the processes mode only")
    if workers is not None and pipeline.get("devices") and len(pipeline["devices"]) != workers:
        raise ValueError(f"pipeline.devices names {len(pipeline['devices'])} devices for {workers} workers: "
                         "one per worker")
    return Resolved(from_spec(values, start and start.config), workers or 1)


def check_fits(config: RunConfig, input_shape: tuple[int, ...], num_classes: int, max_parameters: int,
               input_kind: str = TENSOR) -> None:
    """The network fits the data (texts for a text arch, numbers for the others) and the parameter limit
    (AL_MAX_PARAMETERS); ValueError says how it does not. A text model is counted with its whole `vocab_size`
    (the vocabulary it learns may be smaller) and reads `max_tokens` token ids."""
    arch = config.model.arch
    if (arch in TEXT_ARCHS) != (input_kind == TEXT):
        raise ValueError(f"arch {arch} reads {'texts' if arch in TEXT_ARCHS else 'numbers'}, the dataset holds "
                         f"{'texts' if input_kind == TEXT else 'numbers'}; text datasets train with arch "
                         f"{' or '.join(TEXT_ARCHS)}")
    if input_kind == TEXT:
        input_shape = (config.model.max_tokens,)
    parameters = count_parameters(config.model, input_shape, num_classes, config.training.method)
    if parameters > max_parameters:
        raise ValueError(f"the network would have {parameters:,} parameters, over the limit of "
                         f"{max_parameters:,} (AL_MAX_PARAMETERS)")


def pipeline_workers(spec: dict) -> int:
    """How many workers train a (checked) job spec at once: one per stage of a `processes` pipeline that asks
    for them."""
    return int((spec.get("pipeline") or {}).get("workers") or 1)
