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

LATEST_TTL = 1.0  # seconds a name's latest version is remembered: a new version answers within this
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
        self._latest: dict[tuple[str, str], tuple[float, ModelRow]] = {}
        self._finding: dict[tuple[str, str, int | None], asyncio.Future] = {}
        self._lock = threading.Lock()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="al-inference",
                                      initializer=torch.set_num_threads, initargs=(settings.inference_threads,))
        self.batcher = Batcher(executor, settings.batch_max_size, settings.batch_wait_ms / 1000,
                               settings.batch_queue_rows)

    def registered(self, tenant: str, name: str, version: int | None) -> ModelRow | None:
        """The registry's row; the latest version of a name is looked up at most every LATEST_TTL seconds."""
        if version is not None:
            return self.store.get_model(tenant, name, version)
        now = time.monotonic()
        cached = self._latest.get((tenant, name))
        if cached and now - cached[0] < LATEST_TTL:
            return cached[1]
        row = self.store.get_model(tenant, name)
        if row is not None:
            self._latest[(tenant, name)] = (now, row)
        return row

    def forget(self, row: ModelRow) -> None:
        """A deleted version: out of the cache at once, so that it answers no request after its delete."""
        with self._lock:
            self._models.pop((row.tenant, row.name, row.version), None)
            latest = self._latest.get((row.tenant, row.name))
            if latest is not None and latest[1].version == row.version:
                del self._latest[(row.tenant, row.name)]

    async def find(self, tenant: str, name: str, version: int | None,
                   find_model: Callable[[], tuple[ModelRow, LoadedModel]]) -> tuple[ModelRow, LoadedModel]:
        """The row and the model: at hand, or from `find_model()` (store, disk) in a worker thread, called
        once for all the requests that want the same name and version meanwhile. A name's latest version
        is re-read every LATEST_TTL seconds in the background: requests go on with the one known meanwhile."""
        found = self.at_hand(tenant, name, version)
        stale = (version is None and found is not None
                 and time.monotonic() - self._latest[(tenant, name)][0] >= LATEST_TTL)
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

    def at_hand(self, tenant: str, name: str, version: int | None) -> tuple[ModelRow, LoadedModel] | None:
        """The row and the model when neither the store nor the disk is needed (so the event loop may ask)."""
        if version is None:
            latest = self._latest.get((tenant, name))
            if latest is None:
                return None
            version = latest[1].version
        with self._lock:
            found = self._models.get((tenant, name, version))
            if found is not None:
                self._models.move_to_end((tenant, name, version))
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
