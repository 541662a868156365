"""The Open Inference Protocol v2 (KServe, Triton): health, model metadata, readiness, infer.

Errors here are `{"error": "..."}` (see app/main.py), as the protocol says.
"""

from __future__ import annotations

import json
import math

import numpy as np
from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool

from al import __version__
from app.api.deps import Caller, Core, CoreDep, PredictCaller, VersionPath, public, require
from app.api.routes.models import find_model, model_for
from app.schemas import (
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ServerMetadata,
    V2Tensor,
    V2TensorMetadata,
)

PLATFORM = "pytorch_associated_learning"
# Triton's binary tensor data extension: little-endian values, back to back, in the order of the inputs.
BINARY_DTYPES = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
ERRORS = {400: {"model": V2Error}, 404: {"model": V2Error}}

health = APIRouter(prefix="/v2/health", tags=["v2"], dependencies=[Depends(public)])
router = APIRouter(prefix="/v2", tags=["v2"], responses=ERRORS)


@health.get("/live", summary="The server is up")
def live() -> dict:
    return {"live": True}


@health.get("/ready", summary="The server can serve: its job store answers",
            responses={503: {"model": V2Error, "description": "the job store does not answer"}})
async def ready(core: CoreDep) -> dict:
    if not await run_in_threadpool(core.store.ping):
        raise HTTPException(503, "the job store does not answer")
    return {"ready": True}


@router.get("", response_model=V2ServerMetadata, summary="Server metadata",
            dependencies=[Depends(require("predict"))])
def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="associated-learning", version=__version__, extensions=[])


def metadata(core: Core, caller: Caller, name: str, version: int | None) -> V2ModelMetadata:
    row, model = find_model(core, caller, name, version)
    versions = ([str(r.version) for r in core.store.list_models(caller.tenant, name)] if version is None
                else [str(version)])
    class_type = "INT64" if all(isinstance(c, int) for c in model.classes) else "BYTES"
    return V2ModelMetadata(
        name=name, versions=versions, platform=PLATFORM,
        inputs=[V2TensorMetadata(name="input", datatype="FP32", shape=[-1, model.num_features])],
        outputs=[V2TensorMetadata(name="predictions", datatype=class_type, shape=[-1]),
                 V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(model.classes)]),
                 V2TensorMetadata(name="depths", datatype="INT64", shape=[-1])],
    )


def json_from_binary(body: bytes, header_length: int) -> bytes:
    """A request in Triton's binary tensor data extension (a JSON header of `header_length` bytes, then the
    inputs' raw values) as the plain JSON request it stands for; ValueError names what does not fit."""
    if not 0 < header_length <= len(body):
        raise ValueError(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
    try:
        request = json.loads(body[:header_length])
        inputs = list(request["inputs"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("the JSON header before the binary data is not an inference request") from None
    offset = header_length
    for tensor in inputs:
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if datatype not in BINARY_DTYPES:
            raise ValueError(f"input {name!r}: binary data of datatype {datatype!r} is not supported")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(body) - offset:
            raise ValueError(f"input {name!r}: binary_data_size {size!r} does not fit the {len(body) - offset} "
                             "bytes left")
        values = np.frombuffer(body[offset:offset + size], dtype=BINARY_DTYPES[datatype])
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape) or math.prod(shape) != len(values):
            raise ValueError(f"input {name!r}: shape {shape!r} does not match {len(values)} binary values")
        tensor["data"] = values.tolist()
        del parameters["binary_data_size"]
        offset += size
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes of binary data belong to no input")
    return json.dumps(request).encode()


def parameter(body: V2InferRequest, name: str, valid, what: str):
    """`parameters[name]`, None when absent; a 400 naming it unless `valid(value)` (a bool never is)."""
    value = (body.parameters or {}).get(name)
    if value is not None and (isinstance(value, bool) or not valid(value)):
        raise HTTPException(400, f"parameter {name} must be {what}, got {value!r}")
    return value


async def infer(core: Core, caller: Caller, name: str, version: int | None,
                body: V2InferRequest) -> V2InferResponse:
    row, model = await model_for(core, caller, name, version)
    tensor = body.inputs[0]
    expected = math.prod(tensor.shape)
    try:
        x = np.asarray(tensor.data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # OverflowError: an integer literal past float64
        raise HTTPException(400, f"input {tensor.name!r}: data must be numbers, flat or nested row-major") from None
    if x.size != expected:
        raise HTTPException(400, f"input {tensor.name!r}: shape {tensor.shape} needs {expected} values, "
                                 f"data has {x.size}")
    depth = parameter(body, "depth", lambda v: isinstance(v, int), "an integer")
    exit_confidence = parameter(body, "exit_confidence", lambda v: isinstance(v, int | float) and 0 <= v <= 1,
                                "a number between 0 and 1")  # NaN is not
    try:
        request = model.request(x.reshape(tensor.shape[0], -1), depth, exit_confidence)
    except ValueError as e:  # wrong feature count, NaN or infinity, depth out of range
        raise HTTPException(400, f"input {tensor.name!r}: {e}") from None
    predictions, probabilities, depths = await core.models.batcher.submit(row, model, request)
    rows = len(predictions)
    outputs = {
        "predictions": V2Tensor(
            name="predictions", shape=[rows],
            datatype="INT64" if all(isinstance(p, int) for p in predictions) else "BYTES", data=predictions,
        ),
        "probabilities": V2Tensor(
            name="probabilities", shape=[rows, len(model.classes)], datatype="FP32",
            data=[p for row_probabilities in probabilities for p in row_probabilities],
        ),
        "depths": V2Tensor(name="depths", shape=[rows], datatype="INT64", data=depths),
    }
    wanted = [o.name for o in body.outputs] if body.outputs else list(outputs)
    unknown = [w for w in wanted if w not in outputs]
    if unknown:
        raise HTTPException(400, f"unknown output(s) {', '.join(unknown)}; this model has {', '.join(outputs)}")
    return V2InferResponse(model_name=row.name, model_version=str(row.version), id=body.id,
                           outputs=[outputs[w] for w in wanted])


@router.get("/models/{name}", response_model=V2ModelMetadata, summary="Model metadata (latest version)")
def model_metadata(name: str, caller: PredictCaller, core: CoreDep) -> V2ModelMetadata:
    return metadata(core, caller, name, None)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, summary="Model version metadata")
def model_version_metadata(name: str, version: VersionPath, caller: PredictCaller,
                           core: CoreDep) -> V2ModelMetadata:
    return metadata(core, caller, name, version)


@router.get("/models/{name}/ready", summary="The model is loaded and can infer")
def model_ready(name: str, caller: PredictCaller, core: CoreDep) -> dict:
    find_model(core, caller, name)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="The model version is loaded and can infer")
def model_version_ready(name: str, version: VersionPath, caller: PredictCaller, core: CoreDep) -> dict:
    find_model(core, caller, name, version)
    return {"name": name, "version": str(version), "ready": True}


# Unset optional fields (id, parameters) are left out rather than sent as null, as the protocol shows them.
@router.post("/models/{name}/infer", response_model=V2InferResponse, response_model_exclude_none=True,
             summary="Infer with the latest version")
async def model_infer(name: str, body: V2InferRequest, caller: PredictCaller,
                      core: CoreDep) -> V2InferResponse:
    return await infer(core, caller, name, None, body)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse,
             response_model_exclude_none=True, summary="Infer with a version")
async def model_version_infer(
    name: str, version: VersionPath, body: V2InferRequest, caller: PredictCaller, core: CoreDep
) -> V2InferResponse:
    return await infer(core, caller, name, version, body)
