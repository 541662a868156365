"""Datasets: built-in names and user files, checked before anything trains on them.

Every problem raises DataError with a message that names it; nothing is written.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import struct
import zipfile
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


def load_dataset(source: str | os.PathLike) -> Dataset:
    """A built-in name (digits, mnist, fashion-mnist, kmnist) or a .npz / .csv file."""
    source = str(source)
    if source == "digits":
        return _digits()
    if source in IDX_DATASETS:
        return _idx_dataset(source)
    path = Path(source)
    if path.suffix.lower() not in (".npz", ".csv"):
        raise DataError(
            f"unknown dataset {source!r}: use one of {', '.join(BUILTIN_DATASETS)} "
            "or a .npz (arrays x, y) / .csv (label column) file"
        )
    if not path.is_file():
        raise DataError(f"dataset file {source!r} does not exist")
    x, y = read_samples(path)
    return split_samples(x, y, name=path.stem)


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from a .npz or .csv file, with x checked and y still as stored."""
    if path.stat().st_size == 0:
        raise DataError(f"{path.name} is empty")
    if path.suffix.lower() == ".npz":
        x, y = _read_npz(path)
    else:
        x, y = _read_csv(path)
    return check_features(x, what=path.name), _check_label_values(np.asarray(y), path.name)


def _read_npz(path: Path, need_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    if not zipfile.is_zipfile(path):  # np.load would otherwise try to read it as a pickle
        raise DataError(f"{path.name} is not a readable .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (("x", "y") if need_labels else ("x",)) if k not in archive.files]
            if missing:
                raise DataError(f"{path.name} lacks array(s) {', '.join(missing)}; it has {archive.files}")
            return archive["x"], archive["y"] if need_labels else None
    except DataError:
        raise
    except ValueError:  # object arrays need pickle, which is refused
        raise DataError(f"{path.name}: unreadable array holding Python objects; store numbers or strings") from None
    except Exception as e:
        raise DataError(f"{path.name} is not a readable .npz archive ({type(e).__name__}: {e})") from None


def _read_csv(path: Path, label_required: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Features and labels: the `label` column, else the last one (None if not required and absent)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if row]
    if len(rows) < 2:
        raise DataError(f"{path.name} needs a header row and at least one data row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if "label" in header:
        label_col = header.index("label")
    else:
        label_col = len(header) - 1 if label_required else None
    if label_required and len(header) < 2:
        raise DataError(f"{path.name} needs at least one feature column and a label column")
    features, labels = [], []
    for line_no, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path.name} line {line_no}: {len(row)} fields, the header has {len(header)}")
        if label_col is not None:
            labels.append(row[label_col].strip())
        try:
            features.append([float(v) for j, v in enumerate(row) if j != label_col])
        except ValueError:
            raise DataError(f"{path.name} line {line_no}: a feature value is not a number") from None
    if label_col is None:
        return np.asarray(features, dtype=np.float64), None
    y = np.asarray(labels)
    try:  # numeric labels stay numeric so that 1 and 1.0 are one class
        y = y.astype(np.float64)
    except ValueError:
        pass
    return np.asarray(features, dtype=np.float64), y


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


def check_features(x: np.ndarray, what: str) -> np.ndarray:
    """x as float32 of shape (N, F), (N, 1, H, W) or (N, C, H, W), with finite values."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what}: features must be numbers, got dtype {x.dtype}")
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(f"{what}: features must have shape (N, F), (N, H, W) or (N, C, H, W), got {x.shape}")
    if x.shape[0] == 0 or 0 in x.shape:
        raise DataError(f"{what}: no samples (shape {x.shape})")
    if x.ndim == 3:
        x = x[:, None]
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{what}: features contain NaN or infinity (first at sample {row})")
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


def split_samples(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    """A stratified test split (TEST_FRACTION, fixed seed) of samples that ship without one."""
    indices, classes = encode_labels(x, y, name)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(x), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(indices == c)
        rng.shuffle(members)
        test[members[: int(round(len(members) * TEST_FRACTION))]] = True
    if test.all() or not test.any():
        raise DataError(f"{name}: too few samples ({len(x)}) for a training and a test split")
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


def _idx_dataset(name: str) -> Dataset:
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for directory in dataset_dirs(name):
        paths = [_find_idx(directory, f) for f in files]
        if all(paths):
            train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
            train_x, test_x = (check_features(a, what=name) for a in (train_x, test_x))
            if len(train_x) != len(train_y) or len(test_x) != len(test_y):
                raise DataError(f"{name} in {directory}: image and label files disagree in length")
            train_idx, classes = encode_labels(train_x, train_y, name)
            test_idx = np.searchsorted(classes, test_y)
            return Dataset(train_x, train_idx, test_x, test_idx, classes, name)
    where = " or ".join(str(d) for d in dataset_dirs(name))
    hint = " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DataError(
        f"dataset {name!r} not found: put {', '.join(f + '.gz' for f in files)} in {where}, "
        f"or set AL_DATASETS_DIR to a folder holding {name}/{hint}"
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, struct.error, ValueError, EOFError) as e:
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
