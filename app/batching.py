"""Dynamic batching: concurrent predict requests with the same model version, depth and exit_confidence
share one forward on the inference thread.

Everything here but `forward` runs on the event loop, so it needs no locks. While the inference thread
is busy, requests gather into the next batch, which goes as soon as the thread is free; when the thread
is idle, a request waits at most `wait` seconds for others to join (0: it goes at once).
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from al.checkpoint import InferenceRequest, LoadedModel, Prediction
from service.store import ModelRow


class Key(NamedTuple):
    """What requests must share to share a forward: the model version, and how far its rows may go."""

    tenant: str
    model: str
    version: int
    depth: int | None
    exit_confidence: float | None


@dataclass
class Group:
    """Requests waiting for a forward with the same key."""

    model: LoadedModel
    requests: deque[tuple[InferenceRequest, asyncio.Future]] = field(default_factory=deque)

    @property
    def rows(self) -> int:
        return sum(len(request.x) for request, _ in self.requests)


class QueueFull(Exception):
    """The requests waiting for the inference thread hold as many rows as the queue takes."""

    def __init__(self, rows: int):
        super().__init__(f"the inference queue holds {rows} rows, all it takes (AL_BATCH_QUEUE_ROWS); retry shortly")


class Batcher:
    def __init__(self, executor: Executor, max_size: int, wait: float, max_queued_rows: int):
        self.executor, self.max_size, self.wait = executor, max_size, wait
        self.max_queued_rows, self.queued_rows = max_queued_rows, 0  # rows accepted and not yet answered
        self.groups: dict[Key, Group] = {}  # the oldest first: groups take turns
        self.busy = False  # a forward is on the inference thread
        self.timer: asyncio.TimerHandle | None = None

    async def submit(self, row: ModelRow, model: LoadedModel, request: InferenceRequest) -> Prediction:
        """The prediction of `model` (the registry's `row`) for a request it checked (LoadedModel.request);
        QueueFull when the queue is not empty and the request's rows would take it past its bound."""
        rows = len(request.x)
        if self.queued_rows and self.queued_rows + rows > self.max_queued_rows:
            raise QueueFull(self.queued_rows)
        self.queued_rows += rows
        try:
            return await self._submit(row, model, request)
        finally:
            self.queued_rows -= rows

    async def _submit(self, row: ModelRow, model: LoadedModel, request: InferenceRequest) -> Prediction:
        loop = asyncio.get_running_loop()
        if self.max_size == 1:
            return await loop.run_in_executor(self.executor, model.predict, request)
        key = Key(row.tenant, row.name, row.version, request.depth, request.exit_confidence)
        group = self.groups.setdefault(key, Group(model))
        future = loop.create_future()
        group.requests.append((request, future))
        if not self.busy:
            if self.wait == 0 or group.rows >= self.max_size:
                self.dispatch()
            elif self.timer is None:
                self.timer = loop.call_later(self.wait, self.dispatch)
        return await future

    def dispatch(self) -> None:
        """Send the oldest group's first requests, up to max_size rows (one larger request goes alone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch: list[tuple[InferenceRequest, asyncio.Future]] = []
        while not batch and self.groups:
            key = next(iter(self.groups))
            group = self.groups.pop(key)
            rows = 0
            while group.requests and (not batch or rows + len(group.requests[0][0].x) <= self.max_size):
                request, future = group.requests.popleft()
                if not future.done():  # a request whose client went away is dropped
                    batch.append((request, future))
                    rows += len(request.x)
            if group.requests:
                self.groups[key] = group  # the rest goes behind the other groups
        self.busy = bool(batch)
        if batch:
            done = asyncio.get_running_loop().run_in_executor(
                self.executor, forward, group.model, [request for request, _ in batch])
            done.add_done_callback(lambda finished: self.answer(batch, finished))

    def answer(self, batch: list[tuple[InferenceRequest, asyncio.Future]], finished: asyncio.Future) -> None:
        error = finished.exception()  # `forward` catches what predict raises; this is for the unforeseen
        for (_, future), result in zip(batch, [error] * len(batch) if error else finished.result()):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        self.dispatch()


def forward(model: LoadedModel, requests: list[InferenceRequest]) -> list[Prediction | Exception]:
    """On the inference thread: one forward over every request's rows (same depth and exit_confidence), split
    back per request. If it raises, the requests run one by one, so each gets its own answer or error."""
    if len(requests) > 1:
        try:
            joined = model.predict(requests[0]._replace(x=np.concatenate([request.x for request in requests])))
        except Exception:  # noqa: BLE001 - some request's rows broke the batch; the loop below finds which
            pass
        else:
            ends = np.cumsum([len(request.x) for request in requests]).tolist()
            return [Prediction(*(values[start:end] for values in joined))
                    for start, end in zip([0, *ends], ends)]
    return [attempt(model, request) for request in requests]


def attempt(model: LoadedModel, request: InferenceRequest) -> Prediction | Exception:
    try:
        return model.predict(request)
    except Exception as e:  # noqa: BLE001 - handed to this request's caller
        return e
