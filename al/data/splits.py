"""A Dataset as normalised tensors for training: train, validation (carved from train) and test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from al.data.dataset import DataError, Dataset


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
