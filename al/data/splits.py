"""A Dataset as tensors for training: train, validation (carved from train) and test; numbers normalised, texts
as token ids. Both encodings are fitted on the training split alone (or kept from the trained model a run starts
from)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from al.data.dataset import TEXT, DataError, Dataset
from al.data.text import TextEncoding


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

    def files(self) -> dict[str, str]:
        """What a model directory holds of it besides config.json: nothing."""
        return {}


@dataclass
class Splits:
    """Tensors: train, validation (carved from train) and test, encoded by `encoding`."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    encoding: Normalization | TextEncoding  # fitted on train_x alone, or the starting model's


def carve_validation(samples: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices into a dataset's training split: a share drawn at random by `seed`."""
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed))
    n_val = int(samples * val_fraction)
    return order[n_val:].numpy(), order[:n_val].numpy()


def prepare_splits(dataset: Dataset, val_fraction: float, seed: int, vocab_size: int | None = None,
                   max_tokens: int | None = None, encoding: Normalization | TextEncoding | None = None) -> Splits:
    """The tensors of `dataset`, encoded by `encoding` (that of a trained model a run starts from) or by one
    fitted here; a text dataset fitted here needs the vocabulary's size and the tokens a text keeps."""
    train_idx, val_idx = carve_validation(len(dataset.train_x), val_fraction, seed)
    if len(train_idx) == 0:
        raise DataError(f"{dataset.name}: no training samples left after the validation split")
    train_x = dataset.train_x[train_idx]
    if encoding is None and dataset.input_kind == TEXT:
        if vocab_size is None or max_tokens is None:
            raise ValueError("a text dataset needs vocab_size and max_tokens")
        encoding = TextEncoding.fit(train_x, vocab_size, max_tokens)
    elif encoding is None:
        encoding = Normalization.fit(train_x)
    return Splits(
        train_x=encoding.apply(train_x),
        train_y=torch.as_tensor(dataset.train_y[train_idx]),
        val_x=encoding.apply(dataset.train_x[val_idx]),
        val_y=torch.as_tensor(dataset.train_y[val_idx]),
        test_x=encoding.apply(dataset.test_x),
        test_y=torch.as_tensor(dataset.test_y),
        encoding=encoding,
    )
