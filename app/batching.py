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

import numpy as np

from al.checkpoint import LoadedModel, Prediction

Key = tuple[str, str, int, int | None, float | None]  # tenant, model name, version, depth, exit_confidence


@dataclass
class Group:
    """Requests waiting for a forward with the same model and settings."""

    model: LoadedModel
    depth: int | None
    exit_confidence: float | None
    requests: deque[tuple[np.ndarray, asyncio.Future]] = field(default_factory=deque)

    @property
    def rows(self) -> int:
        return sum(len(x) for x, _ in self.requests)


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

    async def predict(self, key: Key, model: LoadedModel, x: np.ndarray, depth: int | None,
                      exit_confidence: float | None) -> Prediction:
        """The prediction for rows `x` (checked already: the right feature count, finite); QueueFull when the
        queue is not empty and `x` would take it past its bound."""
        if self.queued_rows and self.queued_rows + len(x) > self.max_queued_rows:
            raise QueueFull(self.queued_rows)
        self.queued_rows += len(x)
        try:
            return await self._predict(key, model, x, depth, exit_confidence)
        finally:
            self.queued_rows -= len(x)

    async def _predict(self, key: Key, model: LoadedModel, x: np.ndarray, depth: int | None,
                       exit_confidence: float | None) -> Prediction:
        loop = asyncio.get_running_loop()
        if self.max_size == 1:
            return await loop.run_in_executor(self.executor, model.predict, x, depth, exit_confidence)
        group = self.groups.setdefault(key, Group(model, depth, exit_confidence))
        future = loop.create_future()
        group.requests.append((x, future))
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
        batch: list[tuple[np.ndarray, asyncio.Future]] = []
        while not batch and self.groups:
            key = next(iter(self.groups))
            group = self.groups.pop(key)
            rows = 0
            while group.requests and (not batch or rows + len(group.requests[0][0]) <= self.max_size):
                x, future = group.requests.popleft()
                if not future.done():  # a request whose client went away is dropped
                    batch.append((x, future))
                    rows += len(x)
            if group.requests:
                self.groups[key] = group  # the rest goes behind the other groups
        self.busy = bool(batch)
        if batch:
            done = asyncio.get_running_loop().run_in_executor(
                self.executor, forward, group.model, [x for x, _ in batch], group.depth, group.exit_confidence
            )
            done.add_done_callback(lambda finished: self.answer(batch, finished))

    def answer(self, batch: list[tuple[np.ndarray, asyncio.Future]], finished: asyncio.Future) -> None:
        error = finished.exception()  # `forward` catches what predict raises; this is for the unforeseen
        for (_, future), result in zip(batch, [error] * len(batch) if error else finished.result()):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        self.dispatch()


def forward(model: LoadedModel, xs: list[np.ndarray], depth: int | None,
            exit_confidence: float | None) -> list[Prediction | Exception]:
    """On the inference thread: one forward over every request's rows, split back per request. If it
    raises, the requests run one by one, so each gets its own answer or error."""
    if len(xs) > 1:
        try:
            joined = model.predict(np.concatenate(xs), depth, exit_confidence)
        except Exception:  # noqa: BLE001 - some request's rows broke the batch; the loop below finds which
            pass
        else:
            ends = np.cumsum([len(x) for x in xs]).tolist()
            return [Prediction(*(values[start:end] for values in joined))
                    for start, end in zip([0, *ends], ends)]
    return [attempt(model, x, depth, exit_confidence) for x in xs]


def attempt(model: LoadedModel, x: np.ndarray, depth: int | None,
            exit_confidence: float | None) -> Prediction | Exception:
    try:
        return model.predict(x, depth, exit_confidence)
    except Exception as e:  # noqa: BLE001 - handed to this request's caller
        return e
