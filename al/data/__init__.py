"""Datasets: built-in names and user files, checked before anything trains on them.

This module decides which kind a name or file is, and nothing else decides it: a built-in name is
images (images.py); a .npz file is a table of numbers (tabular.py); a .csv file holds texts (text.py) if
its header names the text column, numbers otherwise; a .txt file (inputs to predict) is one text per line.
What every kind becomes and the checks they share are in dataset.py; the tensors a trainer gets, in
splits.py.
Every problem raises DataError with a message that names it; nothing is written.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from al.data import images, tabular, text
from al.data.dataset import TENSOR, TEXT, DataError, DataFile, Dataset, Summary, split_samples
from al.data.images import BUILTIN_DATASETS
from al.data.splits import Normalization, Splits, carve_validation, prepare_splits
from al.data.text import TEXT_COLUMN, TOKENIZER_FILE, TextEncoding

__all__ = [
    "BUILTIN_DATASETS", "TENSOR", "TEXT", "TEXT_COLUMN", "TOKENIZER_FILE", "DataError", "Dataset", "Normalization",
    "Splits", "Summary", "TextEncoding", "carve_validation", "load_dataset", "prepare_splits", "read_inputs",
    "summarize",
]

FILE_SUFFIXES = (".npz", ".csv")
INPUT_SUFFIXES = (*FILE_SUFFIXES, ".txt")
NPZ_CHUNK_BYTES = 8 << 20  # of an array, checked at a time by summarize
CSV_CHUNK_BYTES = 4 << 20  # of text, parsed at a time


def load_dataset(source: str | os.PathLike, text_column: str = TEXT_COLUMN) -> Dataset:
    """A built-in name (digits, mnist, fashion-mnist, kmnist) or a .npz / .csv file; a CSV with a column named
    `text_column` holds texts."""
    source = str(source)
    if source in BUILTIN_DATASETS:
        return images.load(source)
    path = _dataset_file(source)
    x, y = _open(path, text_column).samples()
    return split_samples(x, y, name=path.stem)


def summarize(source: str | os.PathLike, max_bytes: int, max_classes: int, text_column: str = TEXT_COLUMN) -> Summary:
    """Every check load_dataset makes, a few MiB at a time, so a server checks an upload in bounded memory.
    A .npz member that would decompress to more than `max_bytes` is refused before it is read (a zip bomb fits
    under any upload cap), and so is a file with more than `max_classes` classes."""
    source = str(source)
    if source in BUILTIN_DATASETS:
        return images.summarize(source)
    return _open(_dataset_file(source), text_column).summary(max_bytes, max_classes)


def read_inputs(path: Path, text_column: str = TEXT_COLUMN) -> np.ndarray:
    """Samples to predict: `x` of a .npz, a .csv's columns but a `label` column, the texts of a .csv's
    `text_column` (an object array of str), or the lines of a .txt (one text each)."""
    _check_not_empty(path, f"input file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in INPUT_SUFFIXES:
        raise DataError(f"{path.name}: inputs must be a .npz (array x), a .csv file or a .txt (one text per line)")
    if suffix == ".txt":
        return text.read_lines(path)
    return _open(path, text_column).inputs()


def _open(path: Path, text_column: str) -> DataFile:
    """A file with one of FILE_SUFFIXES, read as its kind: a .npz holds arrays; a .csv holds texts if its header
    names `text_column`, numbers otherwise."""
    if path.suffix.lower() == ".npz":
        return tabular.NpzFile(path, NPZ_CHUNK_BYTES)
    header = _csv_header(path)
    if text_column in header:
        return text.TextCsvFile(path, header, text_column)
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
