"""The model registry (one version per succeeded job, names per tenant), its aliases, native prediction, export,
deletes."""

from __future__ import annotations

import json
import math
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from al.checkpoint import LoadedModel, ModelError, read_model_info
from al.export import FORMATS, export_in_child
from app.api.deps import (
    AdminCaller,
    AliasPath,
    Caller,
    Core,
    CoreDep,
    PredictCaller,
    VersionPath,
    body_of,
    iso,
    remove_files,
)
from app.inference import Routes, draw
from app.schemas import AliasPublic, AliasSet, ModelPublic, ModelVersionPublic, PredictRequest, PredictResponse
from service.store import Alias, Conflict, Missing, ModelRow

router = APIRouter(prefix="/v1/models", tags=["models"])


def no_model(name: str, version: int | None = None) -> HTTPException:
    which = f"model {name!r}" + (f" version {version}" if version is not None else "")
    return HTTPException(404, f"no {which}; GET /v1/models lists the registered ones")


def no_alias(name: str, alias: str) -> HTTPException:
    return HTTPException(404, f"model {name!r} has no alias {alias!r}; GET /v1/models/{name} lists its aliases")


def find_model(core: Core, caller: Caller, name: str, version: int) -> tuple[ModelRow, LoadedModel]:
    """The caller's registered model version, loaded; 404 if there is none."""
    row = core.store.get_model(caller.tenant, name, version)
    if row is None:
        core.models.forget(caller.tenant, name, version)  # deleted, maybe through another API process
        raise no_model(name, version)
    try:
        return row, core.models.get(row)
    except ModelError as e:  # its files were removed or damaged on disk
        raise HTTPException(503, f"model {name!r} version {row.version} cannot be loaded: {e}") from None


def shares_of(name: str, routes: Routes, alias: str | None) -> dict[int, float]:
    """The versions that may answer a request for `alias` of `name` (None: one that names no version), with
    their shares; 404 if there are none."""
    shares = routes.shares(alias)
    if not shares:
        raise no_model(name) if routes.latest is None else no_alias(name, alias)
    return shares


async def model_for(core: Core, caller: Caller, name: str,
                    target: int | str | None) -> tuple[ModelRow, LoadedModel]:
    """The model that answers this request for `target`: a version; an alias (a split's version drawn by its
    shares); or neither, then the alias `default`, else the latest version. Resolved to a version here, before
    the model cache and the batcher, which know versions only; the event loop is not blocked (ModelCache)."""
    if isinstance(target, int):
        version = target
    else:
        version = draw(shares_of(name, await core.models.routes(caller.tenant, name), target))
    return await core.models.find(caller.tenant, name, version, lambda: find_model(core, caller, name, version))


def version_public(core: Core, row: ModelRow) -> ModelVersionPublic:
    """From the version's config.json and weights header: a listing loads no weights, and a damaged version is
    listed as unavailable (predict on it answers 503) instead of failing the listing."""
    fields = dict(name=row.name, version=row.version, job_id=row.job_id, created_at=iso(row.created_at))
    try:
        info = read_model_info(core.settings.data_dir / row.path)
    except ModelError as e:
        return ModelVersionPublic(**fields, available=False, error=str(e))
    return ModelVersionPublic(
        **fields, available=True, input_shape=list(info.input_shape), features=math.prod(info.input_shape),
        input_kind=info.input_kind,
        classes=info.config["classes"], depth=info.depth, method=info.config["method"],
        parameters=info.parameters, test_accuracy=(info.config.get("result") or {}).get("test_accuracy"),
        init_from=info.config.get("init_from"), train_components=info.config["training"].get("train_components"),
    )


def alias_public(alias: Alias) -> AliasPublic:
    return AliasPublic(name=alias.name, alias=alias.alias, updated_at=iso(alias.updated_at),
                       versions={str(version): share for version, share in alias.versions.items()})


def model_public(core: Core, rows: list[ModelRow], aliases: list[Alias]) -> ModelPublic:
    return ModelPublic(name=rows[0].name, latest=max(r.version for r in rows),
                       aliases=[alias_public(a) for a in aliases], versions=[version_public(core, r) for r in rows])


@router.get("", response_model=list[ModelPublic], summary="Registered models, their aliases and versions")
def list_models(caller: PredictCaller, core: CoreDep) -> list[ModelPublic]:
    by_name: dict[str, list[ModelRow]] = {}
    for row in core.store.list_models(caller.tenant):
        by_name.setdefault(row.name, []).append(row)
    aliases: dict[str, list[Alias]] = {}
    for alias in core.store.list_aliases(caller.tenant):
        aliases.setdefault(alias.name, []).append(alias)
    return [model_public(core, rows, aliases.get(name, [])) for name, rows in by_name.items()]


@router.get("/{name}", response_model=ModelPublic, summary="One model's aliases and versions")
def get_model(name: str, caller: PredictCaller, core: CoreDep) -> ModelPublic:
    rows = core.store.list_models(caller.tenant, name)
    if not rows:
        raise no_model(name)
    return model_public(core, rows, core.store.list_aliases(caller.tenant, name))


@router.delete("/{name}/versions/{version}", status_code=204, summary="Delete a model version and its files",
               responses={404: {"description": "no such model or version"},
                          409: {"description": "an alias points to it"}})
def delete_model_version(name: str, version: VersionPath, caller: AdminCaller, core: CoreDep) -> None:
    """Only an alias holds a version back (409); it stops answering at once, and a queued job that fine-tunes it
    fails when it starts, saying so."""
    try:
        row = core.store.delete_model(caller.tenant, name, version)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if row is None:
        raise no_model(name, version)
    core.models.forget(row.tenant, row.name, row.version)
    remove_files(core.settings, core.settings.data_dir / row.path)


def check_split(core: Core, name: str, rows: list[ModelRow]) -> None:
    """A split's versions take the same input and answer the same classes, so that a client gets alike answers
    whichever version is drawn; 422 naming the first difference."""
    seen: tuple[int, dict] | None = None
    for row in rows:
        try:
            info = read_model_info(core.settings.data_dir / row.path)
        except ModelError as e:
            raise HTTPException(422, f"versions: model {name!r} version {row.version} cannot be loaded: {e}") from None
        fits = {"input_kind": info.input_kind, "input_shape": list(info.input_shape),
                "classes": info.config["classes"]}
        if seen is None:
            seen = (row.version, fits)
        differ = next((what for what in fits if fits[what] != seen[1][what]), None)
        if differ is not None:
            raise HTTPException(422, f"versions: model {name!r} versions {seen[0]} and {row.version} differ in "
                                     f"{differ} ({str(seen[1][differ])[:80]} and {str(fits[differ])[:80]}); the "
                                     "versions of a split must take the same input and answer the same classes")


@router.put("/{name}/aliases/{alias}", response_model=AliasPublic,
            summary="Point an alias at a version, or split it between versions by share",
            responses={404: {"description": "no such model"},
                       422: {"description": "a version it names does not exist, the shares do not sum to 1, the "
                             "versions of a split differ in input or classes, or the alias is a number"}})
def set_alias(name: str, alias: AliasPath, body: AliasSet, caller: AdminCaller, core: CoreDep) -> AliasPublic:
    """The alias `default` answers the requests that name no version (native and v2); moving it back is a
    rollback. A version an alias points to cannot be deleted."""
    if alias.isdigit():
        raise HTTPException(422, f"alias {alias!r} is a number, which v2 paths read as a version; give it a letter")
    rows = {row.version: row for row in core.store.list_models(caller.tenant, name)}
    if not rows:
        raise no_model(name)
    shares = body.shares()
    check_split(core, name, [rows[version] for version in shares if version in rows])
    try:
        alias_set = core.store.set_alias(caller.tenant, name, alias, shares)
    except Missing as e:  # not registered, or deleted since
        raise HTTPException(422, f"versions: {e}; GET /v1/models/{name} lists its versions") from None
    core.models.forget_routes(caller.tenant, name)
    return alias_public(alias_set)


@router.delete("/{name}/aliases/{alias}", status_code=204, summary="Delete an alias",
               responses={404: {"description": "no such model or alias"}})
def delete_alias(name: str, alias: AliasPath, caller: AdminCaller, core: CoreDep) -> None:
    if not core.store.delete_alias(caller.tenant, name, alias):
        raise no_model(name) if core.store.get_model(caller.tenant, name) is None else no_alias(name, alias)
    core.models.forget_routes(caller.tenant, name)


def named_classes(model: LoadedModel) -> bool:
    """Its classes have names (strings: a text model's, a CSV's with named labels), not only values."""
    return any(isinstance(c, str) for c in model.classes)


def answers(model: LoadedModel, classes: list) -> tuple[list, list[str] | None]:
    """`predictions` and `labels` of predicted class values: indices and names where the classes have names,
    else the values and no labels."""
    if not named_classes(model):
        return classes, None
    index = {c: i for i, c in enumerate(model.classes)}
    return [index[c] for c in classes], [str(c) for c in classes]


def predict_request(body: bytes) -> PredictRequest:
    """The body parsed and checked in one step from its JSON text by pydantic: 64 rows in 0.4 ms, against 1.6 ms
    for FastAPI's json.loads and then the check of the Python lists (one row costs about the same either way)."""
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as e:
        if e.errors()[0]["type"] != "json_invalid":
            raise
        try:  # JSON that pydantic's parser refuses and Python's reads: an escaped lone surrogate ("\\ud800"),
            parsed = json.loads(body)  # which the model's check names (a text that is not valid Unicode)
        except ValueError:
            raise e from None
    return PredictRequest.model_validate(parsed)


async def predict_body(request: Request) -> PredictRequest:
    """The body, read once the caller's scope is decided (the dependency before it)."""
    try:
        return predict_request(await body_of(request))
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


PredictBody = Annotated[PredictRequest, Depends(predict_body)]
# OpenAPI shows the body that predict_body reads (PredictRequest is in its components: app/main.py).
PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/PredictRequest"}}}}}


async def run_predict(core: Core, caller: Caller, name: str, target: int | str | None,
                      body: PredictRequest) -> PredictResponse:
    row, model = await model_for(core, caller, name, target)
    texts = isinstance(body.inputs[0], str)
    try:
        x = body.inputs if texts else np.asarray(body.inputs, dtype=np.float32)
    except ValueError:  # ragged: numpy cannot make one array of the rows
        raise HTTPException(422, "inputs: every row must have the same shape") from None
    try:
        request = model.request(x, body.depth, body.exit_confidence)
    except ValueError as e:  # wrong feature count, texts to a number model and numbers to a text one, depth
        raise HTTPException(422, f"inputs: {e}") from None
    classes, probabilities, depths = await core.models.batcher.submit(row, model, request)
    predictions, labels = answers(model, classes)
    return PredictResponse(predictions=predictions, labels=labels, probabilities=probabilities, depths=depths,
                           model=row.name, version=row.version)


PREDICT_ERRORS = {404: {"description": "no such model, version or alias"},
                  422: {"description": "inputs do not fit the model"}}


@router.post("/{name}/predict", response_model=PredictResponse, responses=PREDICT_ERRORS,
             summary="Predict with the alias `default`, else the latest version", openapi_extra=PREDICT_BODY)
async def predict_latest(name: str, caller: PredictCaller, core: CoreDep, body: PredictBody) -> PredictResponse:
    """The AL inference path: encoders f_1..f_k, the bridge b_k, decoders h_k..h_1 (k = `depth`, default all);
    with `exit_confidence`, each row stops at the first k whose top probability reaches it. `version` in the
    answer says which version answered."""
    return await run_predict(core, caller, name, None, body)


@router.post("/{name}/versions/{version}/predict", response_model=PredictResponse, summary="Predict with a version",
             responses=PREDICT_ERRORS, openapi_extra=PREDICT_BODY)
async def predict_version(name: str, version: VersionPath, caller: PredictCaller, core: CoreDep,
                          body: PredictBody) -> PredictResponse:
    return await run_predict(core, caller, name, version, body)


@router.get("/{name}/versions/{version}/export", response_class=Response,
            summary="A version's inference path as a file for other runtimes (ONNX)",
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the file, as an attachment"},
                       404: {"description": "no such model or version"},
                       422: {"description": "an unknown format, or a depth the model does not have"}})
def export_version(name: str, version: VersionPath, caller: PredictCaller, core: CoreDep,
                   format: Annotated[str, Query(description=f"the file's format: {', '.join(FORMATS)}")],
                   depth: Annotated[int | None, Query(description="the path's depth k (default: the full one)")] = None
                   ) -> Response:
    """f_1..f_k -> b_k -> h_k..h_1 as ONNX with a dynamic batch axis: raw input in (a text model's token ids,
    from its tokenizer.json), the probabilities predict answers out, the class names in its metadata
    (al/export.py). Exported on request, in a child process, one at a time."""
    row = core.store.get_model(caller.tenant, name, version)
    if row is None:
        raise no_model(name, version)
    try:
        exported = export_in_child(core.settings.data_dir / row.path, format, depth)
    except ModelError as e:  # its files were removed or damaged on disk
        raise HTTPException(503, f"model {name!r} version {version} cannot be loaded: {e}") from None
    except ValueError as e:  # the format or the depth
        raise HTTPException(422, str(e)) from None
    filename = f"{name}-{version}-depth{exported.depth}{exported.suffix}"  # names are [A-Za-z0-9._-]
    return Response(exported.content, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post("/{name}/aliases/{alias}/predict", response_model=PredictResponse, responses=PREDICT_ERRORS,
             openapi_extra=PREDICT_BODY,
             summary="Predict with the version an alias points to (a split's: drawn by share, per request)")
async def predict_alias(name: str, alias: AliasPath, caller: PredictCaller, core: CoreDep,
                        body: PredictBody) -> PredictResponse:
    return await run_predict(core, caller, name, alias, body)
