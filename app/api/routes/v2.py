"""The Open Inference Protocol v2 (KServe, Triton): health, model metadata, readiness, infer.

Errors here are `{"error": "..."}` (see app/main.py), as the protocol says.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, NamedTuple

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from al import __version__
from al.data import TEXT
from al.data.text import as_texts
from app.api.deps import MAX_VERSION, Caller, Core, CoreDep, PredictCaller, body_of, public, require
from app.api.routes.models import answers, find_model, model_for, named_classes, shares_of
from app.schemas import (
    V2Error,
    V2InferInput,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ServerMetadata,
    V2Tensor,
    V2TensorMetadata,
)
from service.jobspec import NAME_PATTERN

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


def target_of(version: str) -> int | str:
    """A path's version: a number is a version (400 outside the versions' range, as a bad path is), anything
    else an alias."""
    if not version.isdigit():
        return version
    if not 1 <= int(version) <= MAX_VERSION:
        raise HTTPException(400, f"version {version}: a version is a number from 1 to {MAX_VERSION}")
    return int(version)


def shares_now(core: Core, caller: Caller, name: str, target: int | str | None) -> dict[int, float]:
    """The versions that may answer a request for `target`, as the store has them now; 404 if none."""
    if isinstance(target, int):
        return {target: 1.0}
    return shares_of(name, core.models.read_routes(caller.tenant, name), target)


def metadata(core: Core, caller: Caller, name: str, target: int | str | None) -> V2ModelMetadata:
    """A version's metadata; an alias's lists the versions it points to, and describes the one with the largest
    share (a split's versions take the same input and answer the same classes)."""
    shares = shares_now(core, caller, name, target)
    row, model = find_model(core, caller, name, next(iter(shares)))
    versions = [str(r.version) for r in core.store.list_models(caller.tenant, name)] if target is None else [
        str(version) for version in shares]
    named = named_classes(model)
    class_type = "INT64" if named or all(isinstance(c, int) for c in model.classes) else "BYTES"
    text = model.input_kind == TEXT
    return V2ModelMetadata(
        name=name, versions=versions, platform=PLATFORM,
        inputs=[V2TensorMetadata(name="input", datatype="BYTES" if text else "FP32",
                                 shape=[-1] if text else [-1, model.num_features])],
        outputs=[V2TensorMetadata(name="predictions", datatype=class_type, shape=[-1]),
                 *([V2TensorMetadata(name="labels", datatype="BYTES", shape=[-1])] if named else []),
                 V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, len(model.classes)]),
                 V2TensorMetadata(name="depths", datatype="INT64", shape=[-1])],
    )


class InferBody(NamedTuple):
    """An infer request and its input's values, decoded."""

    request: V2InferRequest
    x: np.ndarray


async def infer_body(request: Request) -> InferBody:
    """The body, read only once the route's key check has passed (the dependency after it) and within the body
    limit (app/edge.py), then decoded in a worker thread: JSON, or Triton's binary tensor data extension (a JSON
    header of Inference-Header-Content-Length bytes, then the input's raw values)."""
    body = await body_of(request)
    return await run_in_threadpool(decode_infer, body, request.headers.get("inference-header-content-length"))


def validated(header: dict | bytes) -> V2InferRequest:
    try:
        return (V2InferRequest.model_validate_json if isinstance(header, bytes) else V2InferRequest.model_validate)(
            header)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


def decode_infer(body: bytes, header_length: str | None) -> InferBody:
    """The request and its values as an array; a 400 naming what does not fit. Binary values become the array
    they are (np.frombuffer: no Python list, no JSON text)."""
    if header_length is None:
        request = validated(body)
        tensor = request.inputs[0]
        if tensor.data is None:
            raise HTTPException(400, f"input {tensor.name!r}: no data; send `data`, or the values in binary after "
                                     "the JSON (Inference-Header-Content-Length)")
        x = json_texts(tensor) if tensor.datatype == "BYTES" else json_numbers(tensor)
        check_size(tensor, x.size)
        return InferBody(request, x)
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise HTTPException(400, f"Inference-Header-Content-Length {header_length} does not fit a body of "
                                 f"{len(body)} bytes")
    offset = int(header_length)
    try:
        header = json.loads(body[:offset])
    except ValueError:
        raise HTTPException(400, "the JSON header before the binary data is not an inference request") from None
    request = validated(header)
    tensor = request.inputs[0]
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        return decode_infer(body[:offset], None) if offset == len(body) else binary_left_over(len(body) - offset)
    dtype = np.dtype(BINARY_DTYPES.get(tensor.datatype, "u1"))  # BYTES: elements of their own lengths
    fits = isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= len(body) - offset
    if not fits or size % dtype.itemsize:
        raise HTTPException(400, f"input {tensor.name!r}: binary_data_size {size!r} does not fit the "
                                 f"{len(body) - offset} bytes left in {tensor.datatype} values")
    if offset + size != len(body):
        binary_left_over(len(body) - offset - size)
    if tensor.datatype == "BYTES":
        x = binary_texts(tensor, memoryview(body)[offset:])
    else:
        x = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    check_size(tensor, x.size)
    return InferBody(request, x)


def json_numbers(tensor: V2InferInput) -> np.ndarray:
    try:
        return np.asarray(tensor.data, dtype=np.float64)
    except (ValueError, TypeError, OverflowError):  # OverflowError: an integer literal past float64
        raise HTTPException(400, f"input {tensor.name!r}: data must be numbers, flat or nested row-major") from None


def json_texts(tensor: V2InferInput) -> np.ndarray:
    """BYTES in JSON: one string per element, as the protocol sends UTF-8 text."""
    wrong = next((item for item in tensor.data if not isinstance(item, str)), None)
    if wrong is not None:
        raise HTTPException(400, f"input {tensor.name!r}: BYTES data must be strings, got {str(wrong)[:40]!r}")
    return as_texts(tensor.data)


def binary_texts(tensor: V2InferInput, data: memoryview) -> np.ndarray:
    """BYTES in Triton's binary form: each element a 4-byte little-endian length, then that many bytes (UTF-8)."""
    texts, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "little") if at + 4 <= len(data) else None
        if length is None or at + 4 + length > len(data):
            raise HTTPException(400, f"input {tensor.name!r}: BYTES element {len(texts)} runs past the "
                                     f"{len(data)} bytes of binary data (each is a 4-byte little-endian length, "
                                     "then that many bytes)")
        try:
            texts.append(str(data[at + 4:at + 4 + length], "utf-8"))
        except UnicodeDecodeError:
            raise HTTPException(400, f"input {tensor.name!r}: BYTES element {len(texts)} is not UTF-8") from None
        at += 4 + length
    return as_texts(texts)


def check_size(tensor: V2InferInput, size: int) -> None:
    expected = math.prod(tensor.shape)
    if size != expected:
        raise HTTPException(400, f"input {tensor.name!r}: shape {tensor.shape} needs {expected} values, "
                                 f"data has {size}")


def binary_left_over(size: int) -> InferBody:
    raise HTTPException(400, f"{size} bytes of binary data belong to no input")


def parameter(body: V2InferRequest, name: str, valid, what: str):
    """`parameters[name]`, None when absent; a 400 naming it unless `valid(value)` (a bool never is)."""
    value = (body.parameters or {}).get(name)
    if value is not None and (isinstance(value, bool) or not valid(value)):
        raise HTTPException(400, f"parameter {name} must be {what}, got {value!r}")
    return value


async def infer(core: Core, caller: Caller, name: str, target: int | str | None,
                decoded: InferBody) -> V2InferResponse:
    row, model = await model_for(core, caller, name, target)
    body, tensor, x = decoded.request, decoded.request.inputs[0], decoded.x
    depth = parameter(body, "depth", lambda v: isinstance(v, int), "an integer")
    exit_confidence = parameter(body, "exit_confidence", lambda v: isinstance(v, int | float) and 0 <= v <= 1,
                                "a number between 0 and 1")  # NaN is not
    try:
        request = model.request(x if tensor.datatype == "BYTES" else x.reshape(tensor.shape[0], -1), depth,
                                exit_confidence)
    except ValueError as e:  # wrong feature count, NaN or infinity, texts to a number model or numbers to a text
        # model, depth out of range
        raise HTTPException(400, f"input {tensor.name!r}: {e}") from None
    classes, probabilities, depths = await core.models.batcher.submit(row, model, request)
    predictions, labels = answers(model, classes)
    rows = len(predictions)
    outputs = {
        "predictions": V2Tensor(
            name="predictions", shape=[rows],
            datatype="INT64" if all(isinstance(p, int) for p in predictions) else "BYTES", data=predictions,
        ),
        **({"labels": V2Tensor(name="labels", shape=[rows], datatype="BYTES", data=labels)} if labels else {}),
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


# In place of a version number, a path may name an alias of the model.
VersionOrAlias = Annotated[str, Path(pattern=NAME_PATTERN, description="a version of the model, or an alias")]


@router.get("/models/{name}", response_model=V2ModelMetadata,
            summary="Model metadata (of what answers unversioned requests: the alias `default`, else the latest)")
def model_metadata(name: str, caller: PredictCaller, core: CoreDep) -> V2ModelMetadata:
    return metadata(core, caller, name, None)


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata,
            summary="Model version (or alias) metadata")
def model_version_metadata(name: str, version: VersionOrAlias, caller: PredictCaller,
                           core: CoreDep) -> V2ModelMetadata:
    return metadata(core, caller, name, target_of(version))


def check_ready(core: Core, caller: Caller, name: str, target: int | str | None) -> None:
    """Every version that may answer a request for `target` loads; else 404 or 503 (find_model)."""
    for version in shares_now(core, caller, name, target):
        find_model(core, caller, name, version)


@router.get("/models/{name}/ready", summary="The model is loaded and can infer")
def model_ready(name: str, caller: PredictCaller, core: CoreDep) -> dict:
    check_ready(core, caller, name, None)
    return {"name": name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready",
            summary="The model version (or every version of the alias) is loaded and can infer")
def model_version_ready(name: str, version: VersionOrAlias, caller: PredictCaller, core: CoreDep) -> dict:
    target = target_of(version)
    check_ready(core, caller, name, target)
    return {"name": name, "version": str(target), "ready": True}


# The infer routes read their body themselves (infer_body), after the caller's scope is decided; OpenAPI
# shows the JSON form (V2InferRequest is in its components: app/main.py), and the binary form is Triton's
# extension of it.
INFER_BODY = {"requestBody": {"required": True, "description": "JSON; or Triton's binary tensor data extension: "
                              "that JSON (input parameters.binary_data_size, no data) in the first "
                              "Inference-Header-Content-Length bytes, then the values, little-endian",
                              "content": {"application/json": {"schema": {
                                  "$ref": "#/components/schemas/V2InferRequest"}}}}}
InferBodyDep = Annotated[InferBody, Depends(infer_body)]


# Unset optional fields (id, parameters) are left out rather than sent as null, as the protocol shows them.
@router.post("/models/{name}/infer", response_model=V2InferResponse, response_model_exclude_none=True,
             summary="Infer with the alias `default`, else the latest version", openapi_extra=INFER_BODY)
async def model_infer(name: str, caller: PredictCaller, core: CoreDep, body: InferBodyDep) -> V2InferResponse:
    return await infer(core, caller, name, None, body)


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse,
             response_model_exclude_none=True, summary="Infer with a version, or an alias (a split's version is "
             "drawn by share, per request; `model_version` says which answered)", openapi_extra=INFER_BODY)
async def model_version_infer(name: str, version: VersionOrAlias, caller: PredictCaller, core: CoreDep,
                              body: InferBodyDep) -> V2InferResponse:
    return await infer(core, caller, name, target_of(version), body)
