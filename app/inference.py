"""Registered models, loaded once and kept (least recently used out) for inference; which version answers a
request (a name's routes: its latest version and its aliases)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from al.checkpoint import LoadedModel, load_model
from app.batching import Batcher
from service.settings import Settings
from service.store import ModelRow, Store

ROUTES_TTL = 1.0  # seconds a name's routes are remembered: a new version or a moved alias answers within this
DEFAULT_ALIAS = "default"  # the alias that, when set, answers the requests that name no version
# A model is known by its tenant, name and version: two tenants' "digits" are different models.
ModelKey = tuple[str, str, int]


@dataclass(frozen=True)
class Routes:
    """Where a model name's requests go: its latest version, and its aliases' versions with their shares."""

    latest: int | None  # None: the name has no version
    aliases: dict[str, dict[int, float]]  # the largest share first

    def shares(self, alias: str | None) -> dict[int, float]:
        """The versions that may answer a request for `alias` (None: one that names no version, which the alias
        `default` answers, else the latest), with their shares; empty if there is no such alias."""
        if alias is None and DEFAULT_ALIAS not in self.aliases:
            return {} if self.latest is None else {self.latest: 1.0}
        return self.aliases.get(alias or DEFAULT_ALIAS, {})


def draw(shares: dict[int, float]) -> int:
    """The version that answers one request: of a split, drawn by the shares."""
    return random.choices(list(shares), list(shares.values()))[0] if len(shares) > 1 else next(iter(shares))


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
        self._routes: dict[tuple[str, str], tuple[float, Routes]] = {}
        self._reading: dict[tuple[str, str], asyncio.Future] = {}
        self._finding: dict[ModelKey, asyncio.Future] = {}
        self._confirmed: dict[ModelKey, float] = {}  # when the store last said that a loaded version exists
        self._lock = threading.Lock()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="al-inference",
                                      initializer=torch.set_num_threads, initargs=(settings.inference_threads,))
        self.batcher = Batcher(executor, settings.batch_max_size, settings.batch_wait_ms / 1000,
                               settings.batch_queue_rows)

    def read_routes(self, tenant: str, name: str) -> Routes:
        """A name's routes as the store has them now."""
        latest = self.store.get_model(tenant, name)
        return Routes(latest.version if latest else None,
                      {a.alias: a.versions for a in self.store.list_aliases(tenant, name)})

    async def routes(self, tenant: str, name: str) -> Routes:
        """A name's routes: at hand, or read from the store in a worker thread, once for all the requests that
        want them meanwhile. They are re-read every ROUTES_TTL seconds in the background: requests go on with
        the ones known meanwhile."""
        key = (tenant, name)
        known = self._routes.get(key)
        if known is None or time.monotonic() - known[0] >= ROUTES_TTL:
            reading = self._reading.get(key) or self._read(key)
            if known is None:
                return await asyncio.shield(reading)  # a waiter that goes away leaves it to the others
        return known[1]

    def _read(self, key: tuple[str, str]) -> asyncio.Future:
        reading = self._reading[key] = asyncio.ensure_future(run_in_threadpool(self.read_routes, *key))
        reading.add_done_callback(lambda done: self._read_done(key, done))
        return reading

    def _read_done(self, key: tuple[str, str], done: asyncio.Future) -> None:
        failed = done.cancelled() or done.exception() is not None  # retrieved: a failed background read matters
        # only to requests that waited for it
        if self._reading.get(key) is done:  # not forgotten meanwhile (forget_routes): what it read still holds
            del self._reading[key]
            # A name without versions is not kept: requests for made-up names must not fill the memory.
            if not failed and done.result().latest is not None:
                self._routes[key] = (time.monotonic(), done.result())

    def forget_routes(self, tenant: str, name: str) -> None:
        """A name's versions or aliases changed: the next request reads its routes again (this process at once;
        the others within ROUTES_TTL). A read begun before the change keeps its answer to itself."""
        self._routes.pop((tenant, name), None)
        self._reading.pop((tenant, name), None)

    def forget(self, tenant: str, name: str, version: int) -> None:
        """A deleted version (through this process, or found gone from the store): out of the cache at once, so
        that it answers no request after that."""
        with self._lock:
            self._models.pop((tenant, name, version), None)
            self._confirmed.pop((tenant, name, version), None)
        self.forget_routes(tenant, name)

    async def find(self, tenant: str, name: str, version: int,
                   find_model: Callable[[], tuple[ModelRow, LoadedModel]]) -> tuple[ModelRow, LoadedModel]:
        """The row and the model: at hand, or from `find_model()` (store, disk) in a worker thread, called
        once for all the requests that want the same version meanwhile. A version at hand is asked for again
        every ROUTES_TTL seconds in the background, so that one deleted through another API process stops
        answering here within that (`drop`); requests go on with the one at hand meanwhile."""
        key = (tenant, name, version)
        found = self.at_hand(tenant, name, version)
        stale = found is not None and time.monotonic() - self._confirmed.get(key, 0.0) >= ROUTES_TTL
        if found is None or stale:
            if key not in self._finding:
                self._finding[key] = asyncio.ensure_future(run_in_threadpool(find_model))
                self._finding[key].add_done_callback(lambda done: self._found(key, done))
            if found is None:
                return await asyncio.shield(self._finding[key])  # a waiter that goes away leaves it to the others
        return found

    def _found(self, key: ModelKey, done: asyncio.Future) -> None:
        del self._finding[key]
        if not done.cancelled():
            done.exception()  # retrieved: it matters only to requests that waited for it

    def at_hand(self, tenant: str, name: str, version: int) -> tuple[ModelRow, LoadedModel] | None:
        """The row and the model when neither the store nor the disk is needed (so the event loop may ask)."""
        with self._lock:
            found = self._models.get((tenant, name, version))
            if found is not None:
                self._models.move_to_end((tenant, name, version))
            return found

    def get(self, row: ModelRow) -> LoadedModel:
        key = (row.tenant, row.name, row.version)
        with self._lock:
            self._confirmed[key] = time.monotonic()  # the caller has just read the row from the store
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][1]
        model = load_model(self.data_dir / row.path)  # outside the lock: loaded models answer meanwhile
        with self._lock:
            self._models[key] = (row, model)
            if len(self._models) > self.size:
                self._models.popitem(last=False)
        return model
