"""Registered models, loaded once and kept (least recently used out) for inference."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from al.checkpoint import LoadedModel, load_model
from app.store import ModelRow


class ModelCache:
    def __init__(self, data_dir: Path, size: int):
        self.data_dir, self.size = data_dir, size
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: ModelRow) -> LoadedModel:
        key = (row.name, row.version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_model(self.data_dir / row.path)
            self._models[key] = model
            if len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


def predict(model: LoadedModel, x: np.ndarray, depth: int | None) -> tuple[list, list[list[float]]]:
    """The AL inference path (full, or the shortcut at `depth`); ValueError names any problem."""
    if depth is not None and not 1 <= depth <= model.depth:
        raise ValueError(f"depth must be between 1 and {model.depth} for this model, got {depth}")
    return model.predict(x, depth)
