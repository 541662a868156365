"""What every kind of data becomes (a Dataset), and the checks that all kinds share.

Every problem raises DataError with a message that names it; nothing is written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TEST_FRACTION = 0.2  # for sources that ship no test split
SPLIT_SEED = 0  # the test split of a file never depends on the training seed


class DataError(ValueError):
    """The data cannot be used; the message says why."""


TENSOR, TEXT = "tensor", "text"  # the input kinds: numbers (tables, images) or texts


@dataclass
class Dataset:
    """Samples as float32 arrays of shape (N, *input_shape), or texts as object arrays of str (N,), and labels as
    class indices."""

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
    def input_kind(self) -> str:
        return TEXT if self.train_x.dtype == object else TENSOR

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """A hash of the samples, labels, splits and classes: a resumed run checks it trains on the same data."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.train_x, self.train_y, self.test_x, self.test_y):
            digest.update(str((array.dtype.str, array.shape)).encode())
            if array.dtype == object:  # texts: each one's length, then its characters
                for text in array:
                    encoded = text.encode()
                    digest.update(len(encoded).to_bytes(8, "little") + encoded)
            else:
                digest.update(np.ascontiguousarray(array).data)
        digest.update(repr(self.classes).encode())
        return digest.hexdigest()


@dataclass
class Summary:
    """What a dataset holds, read without holding its samples in memory."""

    rows: int
    input_shape: tuple[int, ...]  # () for texts
    classes: list
    input_kind: str = TENSOR


class DataFile(Protocol):
    """A user's file of one kind (al/data/__init__.py decides which), read in the three ways the library needs."""

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) checked: x as features, y as label values (not yet class indices)."""

    def inputs(self) -> np.ndarray:
        """x checked, without labels: samples to predict."""

    def summary(self, max_bytes: int, max_classes: int) -> Summary:
        """Every check `samples` makes, in bounded memory (see al.data.summarize)."""


def check_layout(shape: tuple[int, ...], dtype: np.dtype, what: str) -> tuple[int, ...]:
    """The shape of one sample (N, H, W images get a channel: (1, H, W)), if x's shape and dtype can be used."""
    if dtype.kind not in "biuf":
        raise DataError(f"{what}: features must be numbers, got dtype {dtype}")
    if len(shape) < 2 or len(shape) > 4:
        raise DataError(f"{what}: features must have shape (N, F), (N, H, W) or (N, C, H, W), got {shape}")
    if shape[0] == 0 or 0 in shape:
        raise DataError(f"{what}: no samples (shape {shape})")
    return (1, *shape[1:]) if len(shape) == 3 else tuple(shape[1:])


def check_finite(values: np.ndarray, what: str, offset: int = 0, per_sample: int = 1) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row = (offset + int(np.argwhere(bad)[0][0])) // per_sample
        raise DataError(f"{what}: features contain NaN or infinity (first at sample {row})")


def check_features(x: np.ndarray, what: str) -> np.ndarray:
    """x as float32 of shape (N, F), (N, 1, H, W) or (N, C, H, W), with finite values."""
    sample_shape = check_layout(x.shape, x.dtype, what)
    x = x.reshape(len(x), *sample_shape).astype(np.float32)
    check_finite(x.reshape(len(x), -1), what)
    return x


def check_label_values(y: np.ndarray, what: str) -> np.ndarray:
    """y as integers (whole floats become int64) or strings, one value per sample."""
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


def parse_labels(labels: np.ndarray) -> np.ndarray:
    """Labels read as text: numbers where every one is a number (so that 1 and 1.0 are one class), else strings."""
    try:
        return labels.astype(np.float64)
    except ValueError:
        return labels


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


def check_split(classes: np.ndarray, counts: np.ndarray, what: str) -> None:
    """What split_samples needs: two classes, and samples on both sides of the test split."""
    if len(classes) < 2:
        raise DataError(f"{what}: only one class ({classes[0]!r}); a classifier needs at least two")
    test = sum(_test_size(int(c)) for c in counts)
    if test in (0, int(counts.sum())):
        raise DataError(f"{what}: too few samples ({int(counts.sum())}) for a training and a test split")


def checked_summary(what: str, rows: int, input_shape: tuple[int, ...], classes: np.ndarray, counts: np.ndarray,
                    max_classes: int, input_kind: str = TENSOR) -> Summary:
    """The Summary of a file whose samples were counted and checked: its classes (with `counts` samples each)
    pass the checks that split_samples makes, and are no more than `max_classes`."""
    if len(classes) > max_classes:
        raise DataError(f"{what}: more than {max_classes} classes")
    if int(counts.sum()) != rows:
        raise DataError(f"{what}: {rows} samples but {int(counts.sum())} labels")
    check_split(classes, counts, what)
    return Summary(rows, tuple(input_shape), classes.tolist(), input_kind)


def counted_summary(what: str, rows: int, input_shape: tuple[int, ...], label_counts: dict[str, int],
                    max_classes: int, input_kind: str = TENSOR) -> Summary:
    """checked_summary of labels counted as they were read as text ("1" and "1.0" are one class)."""
    labels = check_label_values(parse_labels(np.array(list(label_counts))), what)
    values, merged = np.unique(labels, return_inverse=True)
    counts = np.bincount(merged, weights=np.array(list(label_counts.values()), dtype=np.float64)).astype(np.int64)
    return checked_summary(what, rows, input_shape, values, counts, max_classes, input_kind)


def split_samples(x: np.ndarray, y: np.ndarray, name: str) -> Dataset:
    """A stratified test split (TEST_FRACTION, fixed seed) of samples that ship without one."""
    indices, classes = encode_labels(x, y, name)
    check_split(np.array(classes), np.bincount(indices), name)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(x), dtype=bool)
    for c in range(len(classes)):
        members = np.flatnonzero(indices == c)
        rng.shuffle(members)
        test[members[: _test_size(len(members))]] = True
    return Dataset(x[~test], indices[~test], x[test], indices[test], classes, name)
