"""Datasets: built-in names and user files, checked before anything trains on them.

Every problem raises DataError with a message that names it; nothing is written.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")
BUILTIN_DATASETS = ("digits", *IDX_DATASETS)
TEST_FRACTION = 0.2  # for sources that ship no test split
SPLIT_SEED = 0  # the test split of a file never depends on the training seed


class DataError(ValueError):
    """The data cannot be used; the message says why."""


@dataclass
class Dataset:
    """Samples as float32 arrays of shape (N, *input_shape) and labels as class indices."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list  # original label values; index = class index
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """A hash of the samples, labels, splits and classes: a resumed run checks it trains on the same data."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.train_x, self.train_y, self.test_x, self.test_y):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).data)
        digest.update(repr(self.classes).encode())
        return digest.hexdigest()


def load_dataset(source: str | os.PathLike) -> Dataset:
    """A built-in name (digits, mnist, fashion-mnist, kmnist) or a .npz / .csv file."""
    source = str(source)
    if source == "digits":
        return _digits()
    if source in IDX_DATASETS:
        return _idx_dataset(source)
    path = _dataset_file(source)
    x, y = read_samples(path)
    return split_samples(x, y, name=path.stem)


@dataclass
class Summary:
    """What a dataset holds, read without holding its samples in memory."""

    rows: int
    input_shape: tuple[int, ...]
    classes: list


def summarize(source: str | os.PathLike, max_bytes: int, max_classes: int) -> Summary:
    """Every check load_dataset makes, a few MiB at a time, so a server checks an upload in bounded memory.
    A .npz member that would decompress to more than `max_bytes` is refused before it is read (a zip bomb fits
    under any upload cap), and so is a file with more than `max_classes` classes."""
    source = str(source)
    if source == "digits":
        data = _digits()
        return Summary(len(data.train_x) + len(data.test_x), data.input_shape, data.classes)
    if source in IDX_DATASETS:
        return _summarize_idx(source)
    path = _dataset_file(source)
    if path.suffix.lower() == ".npz":
        rows, shape, labels = _summarize_npz(path, max_bytes)
        values, counts = np.unique(labels, return_counts=True)
    else:
        rows, shape, raw_counts = 0, (), {}
        for features, raw_labels in _csv_chunks(path, label_required=True):
            features = check_features(features, what=path.name)
            rows, shape = rows + len(features), features.shape[1:]
            for value, count in zip(*np.unique(raw_labels, return_counts=True)):
                raw_counts[value] = raw_counts.get(value, 0) + int(count)
            if len(raw_counts) > max_classes:
                break  # refused below, before the rest is read
        labels = _check_label_values(_csv_labels(np.array(list(raw_counts))), path.name)
        values, merged = np.unique(labels, return_inverse=True)  # "1" and "1.0" are one class
        counts = np.bincount(merged, weights=np.array(list(raw_counts.values()), dtype=np.float64)).astype(np.int64)
    if len(values) > max_classes:
        raise DataError(f"{path.name}: more than {max_classes} classes")
    if int(counts.sum()) != rows:
        raise DataError(f"{path.name}: {rows} samples but {int(counts.sum())} labels")
    _check_split(values, counts, path.name)
    return Summary(rows, tuple(shape), values.tolist())


def _dataset_file(source: str) -> Path:
    path = Path(source)
    if path.suffix.lower() not in (".npz", ".csv"):
        raise DataError(
            f"unknown dataset {source!r}: use one of {', '.join(BUILTIN_DATASETS)} "
            "or a .npz (arrays x, y) / .csv (label column) file"
        )
    if not path.is_file():
        raise DataError(f"dataset file {source!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name} is empty")
    return path


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from a .npz or .csv file, with x checked and y still as stored."""
    if path.suffix.lower() == ".npz":
        x, y = _read_npz(path)
    else:
        x, y = _read_csv(path, label_required=True)
    return check_features(x, what=path.name), _check_label_values(np.asarray(y), path.name)


def read_inputs(path: Path) -> np.ndarray:
    """Samples to predict: `x` of a .npz, or a .csv's columns but a `label` column."""
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name} is empty")
    if path.suffix.lower() == ".npz":
        x, _ = _read_npz(path, need_labels=False)
    elif path.suffix.lower() == ".csv":
        x, _ = _read_csv(path, label_required=False)
    else:
        raise DataError(f"{path.name}: inputs must be a .npz (array x) or a .csv file")
    return check_features(x, what=path.name)


# --- .npz files ----------------------------------------------------------------------

NPZ_CHUNK_BYTES = 8 << 20


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


def _read_npz(path: Path, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    with _npz_errors(path), np.load(path, allow_pickle=False) as archive:
        missing = [k for k in (("x", "y") if need_labels else ("x",)) if k not in archive.files]
        if missing:
            raise DataError(f"{path.name} lacks array(s) {', '.join(missing)}; it has {archive.files}")
        return archive["x"], archive["y"] if need_labels else None


def _summarize_npz(path: Path, max_bytes: int) -> tuple[int, tuple[int, ...], np.ndarray]:
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
            per_chunk = max(1, NPZ_CHUNK_BYTES // dtype.itemsize)
            left, offset = math.prod(shape), 0
            while left:
                count = min(per_chunk, left)
                block = stream.read(count * dtype.itemsize)
                if len(block) != count * dtype.itemsize:
                    raise DataError(f"{path.name}: array x is shorter than its header says")
                _check_finite(np.frombuffer(block, dtype), path.name, offset, math.prod(shape[1:]))
                left, offset = left - count, offset + count
        with archive.open(members["y"]) as stream:
            y = _check_label_values(np.lib.format.read_array(stream, allow_pickle=False), path.name)
    return shape[0], sample_shape, y


def _npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object array")  # _npz_errors: pickled objects are refused
    return shape, fortran_order, dtype


# --- .csv files ----------------------------------------------------------------------

CSV_CHUNK_BYTES = 4 << 20


def _read_csv(path: Path, label_required: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and labels: the `label` column, else the last one (None if not required and absent)."""
    chunks = list(_csv_chunks(path, label_required))
    features = np.concatenate([f for f, _ in chunks])
    if chunks[0][1] is None:
        return features, None
    return features, _csv_labels(np.concatenate([labels for _, labels in chunks]))


def _csv_chunks(path: Path, label_required: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(features as float32, labels as text or None) of a CSV file, CSV_CHUNK_BYTES of text at a time:
    numpy's C parser on each chunk, so memory follows the chunk, not the file."""
    try:
        with open(path, encoding="utf-8") as f:
            numbered = ((n, line) for n, line in enumerate(f, start=1) if line.strip())
            header_line = next(numbered, (0, ""))[1]
            header = [h.strip() for h in next(csv.reader([header_line]))] if header_line else []
            if "label" in header:
                label_col = header.index("label")
            else:
                label_col = len(header) - 1 if label_required else None
            if label_required and len(header) < 2:
                raise DataError(f"{path.name} needs at least one feature column and a label column")
            feature_cols = [j for j in range(len(header)) if j != label_col]
            any_rows = False
            for line_nos, lines in _batches(numbered, CSV_CHUNK_BYTES):
                for line_no, line in zip(line_nos, lines):
                    fields = line.count(",") + 1 if '"' not in line else len(next(csv.reader([line])))
                    if fields != len(header):
                        raise DataError(f"{path.name} line {line_no}: {fields} fields, the header has {len(header)}")
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


def _csv_labels(labels: np.ndarray) -> np.ndarray:
    try:  # numeric labels stay numeric so that 1 and 1.0 are one class
        return labels.astype(np.float64)
    except ValueError:
        return labels


# --- checks ---------------------------------------------------------------------------


def check_layout(shape: tuple[int, ...], dtype: np.dtype, what: str) -> tuple[int, ...]:
    """The shape of one sample (N, H, W images get a channel: (1, H, W)), if x's shape and dtype can be used."""
    if dtype.kind not in "biuf":
        raise DataError(f"{what}: features must be numbers, got dtype {dtype}")
    if len(shape) < 2 or len(shape) > 4:
        raise DataError(f"{what}: features must have shape (N, F), (N, H, W) or (N, C, H, W), got {shape}")
    if shape[0] == 0 or 0 in shape:
        raise DataError(f"{what}: no samples (shape {shape})")
    return (1, *shape[1:]) if len(shape) == 3 else tuple(shape[1:])


def _check_finite(values: np.ndarray, what: str, offset: int = 0, per_sample: int = 1) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = (offset + int(np.argwhere(bad)[0][0])) // per_sample
        raise DataError(f"{what}: features contain NaN or infinity (first at sample {row})")


def check_features(x: np.ndarray, what: str) -> np.ndarray:
    """x as float32 of shape (N, F), (N, 1, H, W) or (N, C, H, W), with finite values."""
    sample_shape = check_layout(x.shape, x.dtype, what)
    x = x.reshape(len(x), *sample_shape).astype(np.float32)
    _check_finite(x.reshape(len(x), -1), what)
    return x


def _check_label_values(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be one value per sample, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{what}: labels contain NaN or infinity")
        if not np.equal(np.round(y), y).all():
            raise DataError(f"{what}: labels must be integers (class ids), found e.g. {y[np.round(y) != y][0]}")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "biuU":
        raise DataError(f"{what}: labels must be integers or strings, got dtype {y.dtype}")
    return y


def encode_labels(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, list]:
    """Class indices for y and the sorted class values, after checking they fit x."""
    if len(y) != len(x):
        raise DataError(f"{what}: {len(x)} samples but {len(y)} labels")
    classes, indices = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{what}: only one class ({classes[0]!r}); a classifier needs at least two")
    return indices.astype(np.int64), classes.tolist()


def _test_size(members: int) -> int:
    return int(round(members * TEST_FRACTION))


def _check_split(classes: np.ndarray, counts: np.ndarray, what: str) -> None:
    """What split_samples needs: two classes, and samples on both sides of the test split."""
    if len(classes) < 2:
        raise DataError(f"{what}: only one class ({classes[0]!r}); a classifier needs at least two")
    test = sum(_test_size(int(c)) for c in counts)
    if test in (0, int(counts.sum())):
        raise DataError(f"{what}: too few samples ({int(counts.sum())}) for a training and a test split")


def split_samples(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    """A stratified test split (TEST_FRACTION, fixed seed) of samples that ship without one."""
    indices, classes = encode_labels(x, y, name)
    _check_split(np.array(classes), np.bincount(indices), name)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(x), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(indices == c)
        rng.shuffle(members)
        test[members[: _test_size(len(members))]] = True
    return Dataset(x[~test], indices[~test], x[test], indices[test], classes, name)


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    return split_samples(x, bunch.target, name="digits")


def dataset_dirs(name: str) -> list[Path]:
    """Where an IDX dataset is looked for, in order."""
    dirs = []
    if os.environ.get("AL_DATASETS_DIR"):
        dirs.append(Path(os.environ["AL_DATASETS_DIR"]) / name)
    dirs.append(Path("/usr/share/datasets") / name)
    return dirs


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_dataset(name: str) -> Dataset:
    train_x, train_y, test_x, test_y = (read_idx(p) for p in _idx_files(name))
    train_x, test_x = (check_features(a, what=name) for a in (train_x, test_x))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise DataError(f"{name}: image and label files disagree in length")
    train_idx, classes = encode_labels(train_x, train_y, name)
    test_idx = np.searchsorted(classes, test_y)
    return Dataset(train_x, train_idx, test_x, test_idx, classes, name)


def _idx_files(name: str) -> list[Path]:
    """The four files of an IDX dataset, from the first folder that has them all."""
    for directory in dataset_dirs(name):
        paths = [_find_idx(directory, f) for f in IDX_FILES]
        if all(paths):
            return paths
    where = " or ".join(str(d) for d in dataset_dirs(name))
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(
        f"dataset {name!r} not found: put {', '.join(f + '.gz' for f in IDX_FILES)} in {where}, "
        f"or set AL_DATASETS_DIR to a folder holding {name}/{hint}"
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    with _idx_errors(path), _open_idx(path) as f:
        shape = _idx_shape(f, path)
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def _summarize_idx(name: str) -> Summary:
    """From the image files' headers and the (small) label files: the images are never read."""
    files = _idx_files(name)
    with _idx_errors(files[0]), _open_idx(files[0]) as f:
        train_shape = _idx_shape(f, files[0])
    with _idx_errors(files[2]), _open_idx(files[2]) as f:
        rows = train_shape[0] + _idx_shape(f, files[2])[0]
    classes = np.unique(read_idx(files[1])).tolist()
    return Summary(rows, check_layout(train_shape, np.dtype(np.uint8), name), classes)


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_shape(f, path: Path) -> tuple[int, ...]:
    zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    return struct.unpack(f">{ndim}I", f.read(4 * ndim))


@contextmanager
def _idx_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, struct.error, ValueError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path} is not a readable IDX file ({e})") from None


# --- tensors for training ------------------------------------------------------------


@dataclass
class Normalization:
    """x -> (x - mean) / std, with statistics of the training split only."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalization:
        # Images share one statistic (pixels are exchangeable); tables get one per feature.
        if x.ndim > 2:
            return cls([float(x.mean())], [max(float(x.std()), 1e-6)])
        return cls(x.mean(axis=0).tolist(), np.maximum(x.std(axis=0), 1e-6).tolist())

    def apply(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        return (x - torch.tensor(self.mean)) / torch.tensor(self.std)


@dataclass
class Splits:
    """Normalised tensors: train, validation (carved from train) and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    normalization: Normalization


def prepare_splits(dataset: Dataset, val_fraction: float, seed: int) -> Splits:
    n = len(dataset.train_x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(n * val_fraction)
    val_idx, train_idx = order[:n_val].numpy(), order[n_val:].numpy()
    if len(train_idx) == 0:
        raise DataError(f"{dataset.name}: no training samples left after the validation split")
    train_x = dataset.train_x[train_idx]
    norm = Normalization.fit(train_x)
    return Splits(
        train_x=norm.apply(train_x),
        train_y=torch.as_tensor(dataset.train_y[train_idx]),
        val_x=norm.apply(dataset.train_x[val_idx]),
        val_y=torch.as_tensor(dataset.train_y[val_idx]),
        test_x=norm.apply(dataset.test_x),
        test_y=torch.as_tensor(dataset.test_y),
        normalization=norm,
    )
