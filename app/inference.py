"""Registered models, loaded once and kept (least recently used out) for inference."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from starlette.concurrency import run_in_threadpool

from al.checkpoint import LoadedModel, load_model
from app.batching import Batcher
from service.settings import Settings
from service.store import ModelRow, Store

# Seconds the registry's word on a row is taken without asking again: a name's new latest version answers within
# this, and so does the removal of a version deleted through another API process (each has its own cache).
LATEST_TTL = 1.0
# A model is known by its tenant, name and version: two tenants' "digits" are different models.
ModelKey = tuple[str, str, int]


class ModelCache:
    """Loaded models, and one thread that runs every inference, fed by `batcher` (Batcher.submit: a
    request the model checked, batched with concurrent ones of the same settings).

    One thread, always the same: torch's intra-op thread pool belongs to the calling thread, and
    calling from ever-changing pool threads cost more than the forward itself for small batches.
    That thread sets its own torch thread count: OpenMP's is per thread, and a thread that never
    sets it gets one per core, whose spinning workers cost more than they save on a busy machine.
    """

    def __init__(self, settings: Settings, store: Store):
        self.data_dir, self.size, self.store = settings.data_dir, settings.model_cache_size, store
        self._models: OrderedDict[ModelKey, tuple[ModelRow, LoadedModel]] = OrderedDict()
        # What the registry said, and when, for a name and version (None: the name's latest version).
        self._rows: dict[tuple[str, str, int | None], tuple[float, ModelRow]] = {}
        self._finding: dict[tuple[str, str, int | None], asyncio.Future] = {}
        self._lock = threading.Lock()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="al-inference",
                                      initializer=torch.set_num_threads, initargs=(settings.inference_threads,))
        self.batcher = Batcher(executor, settings.batch_max_size, settings.batch_wait_ms / 1000,
                               settings.batch_queue_rows)

    def registered(self, tenant: str, name: str, version: int | None) -> ModelRow | None:
        """The registry's row (version None: the latest), read from the store and remembered for `find`; a row
        the store no longer has (deleted, maybe through another API process) is forgotten."""
        row = self.store.get_model(tenant, name, version)
        if row is None:
            self._rows.pop((tenant, name, version), None)
        else:
            self._rows[(tenant, name, version)] = (time.monotonic(), row)
        return row

    def forget(self, row: ModelRow) -> None:
        """A version deleted through this process: out of the cache at once, so that it answers no request after
        its delete. (Another API process learns it within LATEST_TTL, when it asks the registry again.)"""
        with self._lock:
            self._models.pop((row.tenant, row.name, row.version), None)
        for version in (row.version, None):
            key = (row.tenant, row.name, version)
            known = self._rows.get(key)
            if known is not None and known[1].version == row.version:
                self._rows.pop(key, None)

    async def find(self, tenant: str, name: str, version: int | None,
                   find_model: Callable[[], tuple[ModelRow, LoadedModel]]) -> tuple[ModelRow, LoadedModel]:
        """The row and the model: at hand, or from `find_model()` (store, disk) in a worker thread, called
        once for all the requests that want the same name and version meanwhile. The registry is asked again
        every LATEST_TTL seconds in the background (a new latest version, a version deleted elsewhere):
        requests go on with the one known meanwhile."""
        known = self._rows.get((tenant, name, version))  # read once: a worker thread may drop it (registered)
        found = self.loaded(tenant, name, known[1].version) if known else None
        stale = found is not None and time.monotonic() - known[0] >= LATEST_TTL
        if found is None or stale:
            key = (tenant, name, version)
            if key not in self._finding:
                self._finding[key] = asyncio.ensure_future(run_in_threadpool(find_model))
                self._finding[key].add_done_callback(lambda done: self._found(key, done))
            if found is None:
                return await asyncio.shield(self._finding[key])  # a waiter that goes away leaves it to the others
        return found

    def _found(self, key: tuple[str, str, int | None], done: asyncio.Future) -> None:
        del self._finding[key]
        if not done.cancelled():
            done.exception()  # retrieved: a failed background re-read matters only to requests that waited for it

    def loaded(self, tenant: str, name: str, version: int) -> tuple[ModelRow, LoadedModel] | None:
        """The row and the model if it is loaded (no store, no disk: the event loop may ask)."""
        key = (tenant, name, version)
        with self._lock:
            found = self._models.get(key)
            if found is not None:
                self._models.move_to_end(key)
            return found

    def get(self, row: ModelRow) -> LoadedModel:
        key = (row.tenant, row.name, row.version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][1]
        model = load_model(self.data_dir / row.path)  # outside the lock: loaded models answer meanwhile
        with self._lock:
            self._models[key] = (row, model)
            if len(self._models) > self.size:
                self._models.popitem(last=False)
        return model
