"""The built-in image datasets: sklearn's digits, and the IDX sets (mnist, fashion-mnist, kmnist) found on disk."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from al.data.dataset import DataError, Dataset, Summary, check_features, check_layout, encode_labels, split_samples

IDX_DATASETS = ("mnist", "fashion-mnist", "kmnist")
BUILTIN_DATASETS = ("digits", *IDX_DATASETS)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load(name: str) -> Dataset:
    """One of BUILTIN_DATASETS."""
    return _digits() if name == "digits" else _idx_dataset(name)


def summarize(name: str) -> Summary:
    """One of BUILTIN_DATASETS; an IDX set's images are never read, only their files' headers."""
    if name == "digits":
        data = _digits()
        return Summary(len(data.train_x) + len(data.test_x), data.input_shape, data.classes)
    files = _idx_files(name)
    with _idx_errors(files[0]), _open_idx(files[0]) as f:
        train_shape = _idx_shape(f, files[0])
    with _idx_errors(files[2]), _open_idx(files[2]) as f:
        rows = train_shape[0] + _idx_shape(f, files[2])[0]
    classes = np.unique(read_idx(files[1])).tolist()
    return Summary(rows, check_layout(train_shape, np.dtype(np.uint8), name), classes)


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
