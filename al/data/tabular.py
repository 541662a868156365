"""Tables of numbers in user files: .npz arrays (x, y) and .csv files (feature columns and a label column),
read whole or summarised a chunk at a time."""

from __future__ import annotations

import csv
import math
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from al.data.dataset import (
    DataError,
    Summary,
    check_features,
    check_finite,
    check_label_values,
    check_layout,
    checked_summary,
    counted_summary,
    parse_labels,
)


class _Table:
    """Features and labels of one file, checked alike whatever its format (a DataFile)."""

    def __init__(self, path: Path, chunk_bytes: int):
        self.path, self.chunk_bytes = path, chunk_bytes

    def _read(self, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._read(with_labels=True)
        return check_features(x, what=self.path.name), check_label_values(np.asarray(y), self.path.name)

    def inputs(self) -> np.ndarray:
        return check_features(self._read(with_labels=False)[0], what=self.path.name)


# --- .npz files ----------------------------------------------------------------------


class NpzFile(_Table):
    """Arrays x (samples) and y (labels); `chunk_bytes` of x at a time when summarised."""

    def _read(self, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        path = self.path
        with _npz_errors(path), np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (("x", "y") if with_labels else ("x",)) if k not in archive.files]
            if missing:
                raise DataError(f"{path.name} lacks array(s) {', '.join(missing)}; it has {archive.files}")
            return archive["x"], archive["y"] if with_labels else None

    def summary(self, max_bytes: int, max_classes: int) -> Summary:
        """An array that would decompress to more than `max_bytes` is refused before it is read."""
        rows, shape, labels = _summarize_npz(self.path, max_bytes, self.chunk_bytes)
        values, counts = np.unique(labels, return_counts=True)
        return checked_summary(self.path.name, rows, shape, values, counts, max_classes)


@contextmanager
def _npz_errors(path: Path) -> Iterator[None]:
    """A damaged or hostile archive is a DataError that names the file, whatever layer noticed."""
    if not zipfile.is_zipfile(path):  # np.load would otherwise try to read it as a pickle
        raise DataError(f"{path.name} is not a readable .npz archive (not a zip file)")
    try:
        yield
    except DataError:
        raise
    except ValueError:  # object arrays need pickle, which is refused
        raise DataError(f"{path.name}: unreadable array holding Python objects; store numbers or strings") from None
    except Exception as e:
        raise DataError(f"{path.name} is not a readable .npz archive ({type(e).__name__}: {e})") from None


def _summarize_npz(path: Path, max_bytes: int, chunk_bytes: int) -> tuple[int, tuple[int, ...], np.ndarray]:
    """Rows and sample shape of x, streamed through the checks; y itself (one value per row)."""
    with _npz_errors(path), zipfile.ZipFile(path) as archive:
        members = {name.removesuffix(".npy"): archive.getinfo(name) for name in archive.namelist()}
        missing = [k for k in ("x", "y") if k not in members]
        if missing:
            raise DataError(f"{path.name} lacks array(s) {', '.join(missing)}; it has {sorted(members)}")
        for key in ("x", "y"):
            if members[key].file_size > max_bytes:
                raise DataError(f"{path.name}: array {key} decompresses to {members[key].file_size} bytes, "
                                f"over the limit of {max_bytes}")
        with archive.open(members["x"]) as stream:
            shape, fortran_order, dtype = _npy_header(stream)
            sample_shape = check_layout(shape, dtype, path.name)
            # Finiteness is per value, so the file's order (C or Fortran) does not matter here.
            per_chunk = max(1, chunk_bytes // dtype.itemsize)
            left, offset = math.prod(shape), 0
            while left:
                count = min(per_chunk, left)
                block = stream.read(count * dtype.itemsize)
                if len(block) != count * dtype.itemsize:
                    raise DataError(f"{path.name}: array x is shorter than its header says")
                check_finite(np.frombuffer(block, dtype), path.name, offset, math.prod(shape[1:]))
                left, offset = left - count, offset + count
        with archive.open(members["y"]) as stream:
            y = check_label_values(np.lib.format.read_array(stream, allow_pickle=False), path.name)
    return shape[0], sample_shape, y


def _npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object array")  # _npz_errors: pickled objects are refused
    return shape, fortran_order, dtype


# --- .csv files ----------------------------------------------------------------------


class CsvFile(_Table):
    """Number columns and labels: the `label` column, else the last one; `chunk_bytes` of text at a time.
    `header` is the file's column names, which al/data/__init__.py read to tell the file's kind."""

    def __init__(self, path: Path, header: list[str], chunk_bytes: int):
        super().__init__(path, chunk_bytes)
        self.header = header

    def _read(self, with_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Features and labels (None if not required and absent)."""
        chunks = list(self._chunks(label_required=with_labels))
        features = np.concatenate([f for f, _ in chunks])
        if chunks[0][1] is None:
            return features, None
        return features, parse_labels(np.concatenate([labels for _, labels in chunks]))

    def summary(self, max_bytes: int, max_classes: int) -> Summary:
        """`max_bytes` bounds what a compressed array may become; a CSV is read as stored, a chunk at a time."""
        rows, shape, raw_counts = 0, (), {}
        for features, raw_labels in self._chunks(label_required=True):
            features = check_features(features, what=self.path.name)
            rows, shape = rows + len(features), features.shape[1:]
            for value, count in zip(*np.unique(raw_labels, return_counts=True)):
                raw_counts[value] = raw_counts.get(value, 0) + int(count)
            if len(raw_counts) > max_classes:
                break  # refused by checked_summary, before the rest is read
        return counted_summary(self.path.name, rows, shape, raw_counts, max_classes)

    def _chunks(self, label_required: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(features as float32, labels as text or None), chunk_bytes of text at a time: numpy's C parser on
        each chunk, so memory follows the chunk, not the file."""
        path, header = self.path, self.header
        if "label" in header:
            label_col = header.index("label")
        else:
            label_col = len(header) - 1 if label_required else None
        if label_required and len(header) < 2:
            raise DataError(f"{path.name} needs at least one feature column and a label column")
        feature_cols = [j for j in range(len(header)) if j != label_col]
        any_rows = False
        try:
            with open(path, encoding="utf-8") as f:
                numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
                next(numbered, None)  # the header
                for line_nos, lines in _batches(numbered, self.chunk_bytes):
                    for line_no, line in zip(line_nos, lines):
                        fields = line.count(",") + 1 if '"' not in line else len(next(csv.reader([line])))
                        if fields != len(header):
                            raise DataError(f"{path.name} line {line_no}: {fields} fields, "
                                            f"the header has {len(header)}")
                    features = _parse_features(path, line_nos, lines, feature_cols)
                    labels = None
                    if label_col is not None:
                        labels = np.char.strip(_loadtxt(lines, [label_col], str).ravel())
                    any_rows = True
                    yield features, labels
        except UnicodeDecodeError:
            raise DataError(f"{path.name} is not UTF-8 text") from None
        if not any_rows:
            raise DataError(f"{path.name} needs a header row and at least one data row")


def _batches(numbered: Iterator[tuple[int, str]], max_chars: int) -> Iterator[tuple[list[int], list[str]]]:
    line_nos, lines, size = [], [], 0
    for line_no, line in numbered:
        line_nos.append(line_no)
        lines.append(line)
        size += len(line)
        if size >= max_chars:
            yield line_nos, lines
            line_nos, lines, size = [], [], 0
    if lines:
        yield line_nos, lines


def _parse_features(path: Path, line_nos: list[int], lines: list[str], columns: list[int]) -> np.ndarray:
    try:
        return _loadtxt(lines, columns, np.float32)
    except ValueError:
        bad = next(n for n, line in zip(line_nos, lines) if not _parses(line, columns))
        raise DataError(f"{path.name} line {bad}: a feature value is not a number") from None


def _loadtxt(lines: list[str], columns: list[int], dtype) -> np.ndarray:
    return np.loadtxt(lines, delimiter=",", quotechar='"', comments=None, usecols=columns, dtype=dtype, ndmin=2)


def _parses(line: str, columns: list[int]) -> bool:
    try:
        _loadtxt([line], columns, np.float32)
        return True
    except ValueError:
        return False

