"""Registered models, loaded once and kept (least recently used out) for inference."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from al.checkpoint import LoadedModel, Prediction, load_model
from service.store import ModelRow, Store

LATEST_TTL = 1.0  # seconds a name's latest version is remembered: a new version answers within this


class ModelCache:
    """Loaded models, and one thread that runs every inference.

    One thread, always the same: torch's intra-op thread pool belongs to the calling thread, and
    calling from ever-changing pool threads cost more than the forward itself for small batches.
    """

    def __init__(self, data_dir: Path, size: int, store: Store):
        self.data_dir, self.size, self.store = data_dir, size, store
        self._models: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._latest: dict[str, tuple[float, ModelRow]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="al-inference")

    async def run(self, function, *args):
        """`function(*args)` on the inference thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def registered(self, name: str, version: int | None) -> ModelRow | None:
        """The registry's row; the latest version of a name is looked up at most every LATEST_TTL seconds."""
        if version is not None:
            return self.store.get_model(name, version)
        now = time.monotonic()
        cached = self._latest.get(name)
        if cached and now - cached[0] < LATEST_TTL:
            return cached[1]
        row = self.store.get_model(name)
        if row is not None:
            self._latest[name] = (now, row)
        return row

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


def predict(model: LoadedModel, x: np.ndarray, depth: int | None) -> Prediction:
    """The AL inference path (full, or the shortcut at `depth`); ValueError names any problem."""
    if depth is not None and not 1 <= depth <= model.depth:
        raise ValueError(f"depth must be between 1 and {model.depth} for this model, got {depth}")
    return model.predict(x, depth)
