"""Datasets: built-in names and user files, checked before anything trains on them.

This module decides which kind a name or file is, and nothing else decides it: a built-in name is
images (images.py); a .npz or .csv file is a table of numbers (tabular.py). What every kind becomes
and the checks they share are in dataset.py; the tensors a trainer gets, in splits.py.
Every problem raises DataError with a message that names it; nothing is written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from al.data import images, tabular
from al.data.dataset import DataError, DataFile, Dataset, Summary, split_samples
from al.data.images import BUILTIN_DATASETS
from al.data.splits import Normalization, Splits, prepare_splits

__all__ = [
    "BUILTIN_DATASETS", "DataError", "Dataset", "Normalization", "Splits", "Summary",
    "load_dataset", "prepare_splits", "read_inputs", "summarize",
]

FILE_SUFFIXES = (".npz", ".csv")
NPZ_CHUNK_BYTES = 8 << 20  # of an array, checked at a time by summarize
CSV_CHUNK_BYTES = 4 << 20  # of text, parsed at a time


def load_dataset(source: str | os.PathLike) -> Dataset:
    """A built-in name (digits, mnist, fashion-mnist, kmnist) or a .npz / .csv file."""
    source = str(source)
    if source in BUILTIN_DATASETS:
        return images.load(source)
    path = _dataset_file(source)
    x, y = _open(path).samples()
    return split_samples(x, y, name=path.stem)


def summarize(source: str | os.PathLike, max_bytes: int, max_classes: int) -> Summary:
    """Every check load_dataset makes, a few MiB at a time, so a server checks an upload in bounded memory.
    A .npz member that would decompress to more than `max_bytes` is refused before it is read (a zip bomb fits
    under any upload cap), and so is a file with more than `max_classes` classes."""
    source = str(source)
    if source in BUILTIN_DATASETS:
        return images.summarize(source)
    return _open(_dataset_file(source)).summary(max_bytes, max_classes)


def read_inputs(path: Path) -> np.ndarray:
    """Samples to predict: `x` of a .npz, or a .csv's columns but a `label` column."""
    _check_not_empty(path, f"input file {str(path)!r}")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(f"{path.name}: inputs must be a .npz (array x) or a .csv file")
    return _open(path).inputs()


def _open(path: Path) -> DataFile:
    """A file with one of FILE_SUFFIXES, read as its kind: a .npz holds arrays; a .csv's header tells its kind
    (so far every CSV is a table of numbers)."""
    if path.suffix.lower() == ".npz":
        return tabular.NpzFile(path, NPZ_CHUNK_BYTES)
    header = _csv_header(path)
    return tabular.CsvFile(path, header, CSV_CHUNK_BYTES)


def _csv_header(path: Path) -> list[str]:
    """The column names: the first line that is not blank ([] if none)."""
    try:
        with open(path, encoding="utf-8") as f:
            line = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text") from None
    return [name.strip() for name in next(csv.reader([line]))] if line else []


def _dataset_file(source: str) -> Path:
    path = Path(source)
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(
            f"unknown dataset {source!r}: use one of {', '.join(BUILTIN_DATASETS)} "
            "or a .npz (arrays x, y) / .csv (label column) file"
        )
    _check_not_empty(path, f"dataset file {source!r}")
    return path


def _check_not_empty(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{what} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name} is empty")
