"""Datasets: upload a .npz/.csv, checked by al.data before it is kept; built-in names work as ids; delete."""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, UploadFile

from al.data import BUILTIN_DATASETS, TENSOR, TEXT, DataError, Summary, summarize
from app.api.deps import AdminCaller, Core, CoreDep, OffsetQuery, TrainCaller, iso, remove_files
from app.schemas import DatasetList, DatasetPublic
from service.store import Conflict, DatasetRow, QuotaExceeded, new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

COPY_CHUNK = 1 << 20


def dataset_kind(row: DatasetRow) -> str:
    """What an upload's samples are: a text dataset's have no shape (Summary.input_shape ())."""
    return TENSOR if row.shape else TEXT


def dataset_public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic(
        id=row.id, name=row.name, builtin=False, input_kind=dataset_kind(row), rows=row.rows, shape=row.shape,
        features=math.prod(row.shape), classes=row.classes, size_bytes=row.size_bytes, created_at=iso(row.created_at),
    )


def summarize_dataset(core: Core, source: str) -> Summary:
    """The checks of al.data, in bounded memory and under the service's limits."""
    settings = core.settings
    return summarize(source, settings.max_dataset_bytes, settings.max_classes)


def builtin_public(core: Core, name: str) -> DatasetPublic:
    try:
        summary = summarize_dataset(core, name)  # from file headers: the samples are not loaded
    except DataError as e:  # e.g. mnist's files are not installed on this host
        raise HTTPException(404, str(e)) from None
    return DatasetPublic(
        id=name, name=name, builtin=True, rows=summary.rows, shape=list(summary.input_shape),
        features=math.prod(summary.input_shape), classes=summary.classes,
    )


def past_disk_quota(tenant: str, size: int, used: int, quota: int) -> HTTPException:
    return HTTPException(507, f"this upload ({size} bytes) would take the datasets of tenant {tenant!r} to "
                              f"{used + size} bytes, past its disk quota of {quota} bytes (AL_DISK_QUOTA_BYTES); "
                              "delete datasets it no longer needs (DELETE /v1/datasets/{id})")


def check_disk_quota(core: Core, tenant: str, size: int) -> None:
    """Before the upload is read: a file that cannot fit is refused unread (add_dataset checks again, atomically)."""
    quota, used = core.settings.disk_quota_bytes, core.store.dataset_bytes(tenant)
    if used + size > quota:
        raise past_disk_quota(tenant, size, used, quota)


@router.post("", status_code=201, response_model=DatasetPublic, summary="Upload a dataset",
             responses={413: {"description": "the file is larger than AL_MAX_UPLOAD_BYTES"},
                        422: {"description": "the file is not a usable dataset; the message says why"},
                        507: {"description": "the tenant's datasets would exceed AL_DISK_QUOTA_BYTES"}})
def upload_dataset(
    caller: TrainCaller,
    core: CoreDep,
    file: Annotated[UploadFile, File(description=".npz with arrays x (samples) and y (labels), "
                                     "or .csv with a `label` column (numbers), or .csv with a `text` column (a text "
                                     "dataset: a string per row, UTF-8) and a label column")],
) -> DatasetPublic:
    original = PurePath(file.filename or "").name[:255]
    suffix = PurePath(original).suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise HTTPException(422, f"file {original!r}: upload a .npz (arrays x, y) or a .csv (label column; "
                                  "a `text` column makes it a text dataset)")
    check_disk_quota(core, caller.tenant, file.size)
    settings = core.settings
    dataset_id = new_id("ds_")
    incoming = settings.datasets_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    staged = incoming / f"{dataset_id}{suffix}"
    final = settings.datasets_dir / f"{dataset_id}{suffix}"
    try:
        digest = hashlib.sha256()
        with open(staged, "wb") as out:
            for chunk in iter(lambda: file.file.read(COPY_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        try:
            summary = summarize_dataset(core, str(staged))  # also checks it has a train and a test split
        except DataError as e:
            raise HTTPException(422, str(e).replace(staged.name, original)) from None
        size = staged.stat().st_size
        os.replace(staged, final)  # only a checked file ever appears under datasets/
        row = DatasetRow(
            id=dataset_id, tenant=caller.tenant, name=original, path=str(final.relative_to(settings.data_dir)),
            rows=summary.rows, shape=list(summary.input_shape), classes=summary.classes, size_bytes=size,
            sha256=digest.hexdigest(),
            created_at=time.time(),
        )
        try:
            core.store.add_dataset(row, settings.disk_quota_bytes)
        except QuotaExceeded as e:
            final.unlink(missing_ok=True)
            raise past_disk_quota(caller.tenant, size, e.used, e.limit) from None
        except Exception:
            final.unlink(missing_ok=True)
            raise
    finally:
        staged.unlink(missing_ok=True)
    return dataset_public(row)


@router.get("", response_model=DatasetList, summary="List uploaded datasets")
def list_datasets(
    caller: TrainCaller,
    core: CoreDep,
    limit: Annotated[int, Query(ge=1, le=500, description="page size")] = 50,
    offset: OffsetQuery = 0,
) -> DatasetList:
    rows, total = core.store.list_datasets(caller.tenant, limit, offset)
    return DatasetList(items=[dataset_public(r) for r in rows], total=total, limit=limit, offset=offset,
                       builtin=list(BUILTIN_DATASETS))


@router.get("/{dataset_id}", response_model=DatasetPublic, summary="One dataset (uploaded id or built-in name)")
def get_dataset(dataset_id: str, caller: TrainCaller, core: CoreDep) -> DatasetPublic:
    if dataset_id in BUILTIN_DATASETS:
        return builtin_public(core, dataset_id)
    row = core.store.get_dataset(caller.tenant, dataset_id)
    if row is None:
        raise no_dataset(dataset_id)
    return dataset_public(row)


def no_dataset(dataset_id: str) -> HTTPException:
    return HTTPException(404, f"no dataset {dataset_id!r}; built-in ones are {', '.join(BUILTIN_DATASETS)}")


@router.delete("/{dataset_id}", status_code=204, summary="Delete an uploaded dataset and its file",
               responses={400: {"description": "a built-in dataset cannot be deleted"},
                          409: {"description": "a job that has not finished uses it"}})
def delete_dataset(dataset_id: str, caller: AdminCaller, core: CoreDep) -> None:
    if dataset_id in BUILTIN_DATASETS:
        raise HTTPException(400, f"{dataset_id!r} is a built-in dataset; only uploads can be deleted")
    try:
        row = core.store.delete_dataset(caller.tenant, dataset_id)
    except Conflict as e:
        raise HTTPException(409, str(e)) from None
    if row is None:
        raise no_dataset(dataset_id)
    remove_files(core.settings, core.settings.data_dir / row.path)
