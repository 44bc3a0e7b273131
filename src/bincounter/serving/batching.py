"""Dynamic micro-batching: images from concurrent requests share model calls.

Requests put their images in one bounded queue (:class:`Batcher`); each worker has a
consumer that takes up to ``max_batch_size`` images, waiting at most ``max_wait`` for more
once it has one, and runs them as one batch. A full queue refuses new work at once
(:class:`QueueFull`, answered 503 + Retry-After) instead of letting latency grow without end.

:class:`ProcessRunner` supervises the worker processes: a batch whose worker dies or hangs
is retried image by image on a replacement, so only an image that kills a worker twice
fails (400); :class:`InlineRunner` runs an in-process model in a thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

from bincounter.serving.worker import EngineSpec, ModelInfo, Outcome, PyfuncEngine, WorkerProcess

log = logging.getLogger("bincounter.serving")

CRASHED = "the image could not be processed: it crashed the decoder twice (the worker was replaced)"


class QueueFull(Exception):
    """No room for the request's images: shed load."""


@dataclass
class _Item:
    data: bytes
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The bounded queue of images waiting for a worker."""

    def __init__(self, max_batch_size: int, max_wait_s: float, max_queue: int):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._items: collections.deque[_Item] = collections.deque()
        self._idle = 0  # consumers waiting in take()
        self._changed = asyncio.Condition()
        self.in_flight = 0  # images submitted and not yet answered: waiting or in a worker's batch

    @property
    def depth(self) -> int:
        return len(self._items)

    async def submit(self, images: list[bytes]) -> list[Outcome]:
        """Queue the images and wait for their outcomes (in order); raises QueueFull."""
        if len(self._items) + len(images) > self.max_queue:
            raise QueueFull(f"{len(self._items)} images are waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        items = [_Item(data, loop.create_future()) for data in images]
        self._items.extend(items)
        self.in_flight += len(items)
        try:
            async with self._changed:
                self._changed.notify_all()
            # A client that goes away cancels this await, hence its futures: consumers skip them.
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            self.in_flight -= len(items)

    async def take(self) -> list[_Item]:
        """The next batch: waits for one image; takes its share of the queue (idle consumers
        split it, so every worker gets work); when no other consumer is idle, waits up to
        ``max_wait_s`` to fill the batch."""
        self._idle += 1
        try:
            async with self._changed:
                await self._changed.wait_for(self._live)
        finally:
            self._idle -= 1
        share = -(-len(self._items) // (self._idle + 1))  # ceil: idle consumers split the queue
        batch = self._pop(min(self.max_batch_size, share))
        if len(batch) < self.max_batch_size and self.max_wait_s > 0 and self._idle == 0:
            need = self.max_batch_size - len(batch)
            with anyio.move_on_after(self.max_wait_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: len(self._items) >= need)
            batch += self._pop(need)
        return batch

    def _live(self) -> bool:
        while self._items and self._items[0].future.done():  # cancelled by a departed client
            self._items.popleft()
        return bool(self._items)

    def fail_all(self, outcome: Outcome) -> int:
        """Answer every waiting image with ``outcome`` (no worker is left to run them)."""
        failed = self._pop(len(self._items))
        for item in failed:
            item.future.set_result(outcome)
        return len(failed)

    def _pop(self, n: int) -> list[_Item]:
        out = []
        while self._items and len(out) < n:
            item = self._items.popleft()
            if not item.future.done():
                out.append(item)
        return out


def _settle(items: list[_Item], outcomes: list[Outcome] | None = None, error: BaseException | None = None) -> None:
    for i, item in enumerate(items):
        if item.future.done():
            continue
        if error is not None:
            item.future.set_exception(error)
        else:
            item.future.set_result(outcomes[i])


async def _consume(batcher: Batcher, run: Callable[[list[bytes]], Awaitable[list[Outcome]]],
                   observe: Callable[[int, float], None],
                   before_take: Callable[[], Awaitable[None]] | None = None) -> None:
    """Take batches from ``batcher`` forever, ``run`` each and settle its requests: with their
    outcomes, or, when ``run`` raises (a model or engine bug), with the error, which every
    request of the batch answers as a 500. ``observe(size, seconds)`` gets each good batch;
    ``before_take`` is awaited before each batch is taken (a down worker's revival)."""
    while True:
        if before_take is not None:
            await before_take()
        items = await batcher.take()
        if not items:
            continue
        started = time.perf_counter()
        try:
            outcomes = await run([i.data for i in items])
        except Exception as exc:  # noqa: BLE001 - settled on the requests, never ends the consumer
            log.exception("inference failed")
            _settle(items, error=exc)
            continue
        observe(len(items), time.perf_counter() - started)
        _settle(items, outcomes)


class InlineRunner:
    """An in-process model (anything with ``predict(DataFrame)``), run in a thread."""

    workers = 1

    def __init__(self, model: Any, max_pixels: int):
        self.engine = PyfuncEngine(model, backend="inline", max_pixels=max_pixels)
        self.info: ModelInfo = self.engine.info

    def start(self) -> ModelInfo:
        return self.info

    async def consume(self, index: int, batcher: Batcher, observe: Callable[[int, float], None]) -> None:
        await _consume(batcher, lambda images: anyio.to_thread.run_sync(self.engine.run, images), observe)

    def alive(self) -> int:
        return 1

    def stop(self) -> None:
        pass


class WorkerDown(RuntimeError):
    """A worker process died and could not be started again (its model gone, memory short)."""


NO_WORKER = "no inference worker is running"


class ProcessRunner:
    """``workers`` supervised worker processes, each fed by its own consumer.

    A worker that dies or hangs is replaced. One that cannot be started again is down: its
    consumer takes no work until a restart succeeds (retried with backoff), the batch it held
    is answered 503 with the reason, and while no worker runs ``alive()`` is 0, so the server
    answers 503 at once and ``/readyz`` says why, instead of holding requests forever.
    """

    def __init__(self, spec: EngineSpec, workers: int, timeout_s: float,
                 on_restart: Callable[[], None] = lambda: None):
        self.spec = spec
        self.timeout_s = timeout_s
        self.on_restart = on_restart
        self.processes = [WorkerProcess(spec) for _ in range(workers)]
        self.workers = workers
        self.info: ModelInfo | None = None
        self.last_error: str | None = None  # why the last restart failed; None once one succeeds

    def start(self) -> ModelInfo:
        """Start every worker (blocking; the model loads in each)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self.processes)) as pool:
            infos = list(pool.map(lambda w: w.start(), self.processes))
        self.info = infos[0]
        return self.info

    def alive(self) -> int:
        return sum(1 for w in self.processes if w.executor is not None)

    def stop(self) -> None:
        for w in self.processes:
            w.stop()

    async def _restart(self, worker: WorkerProcess) -> None:
        """Replace a dead or hung worker once; WorkerDown when the new one cannot start."""
        worker.kill()
        worker.stop(grace=0)
        self.on_restart()
        try:
            await anyio.to_thread.run_sync(worker.start)
        except Exception as exc:  # noqa: BLE001 - the reason goes to /readyz and the answers
            self.last_error = f"{NO_WORKER}: a restart failed with {type(exc).__name__}: {exc}"
            log.error("could not restart a worker: %s: %s", type(exc).__name__, exc)
            raise WorkerDown(self.last_error) from exc
        self.last_error = None

    async def _revive(self, worker: WorkerProcess) -> None:
        """Retry starting a down worker, with backoff, until it runs."""
        delay = 1.0
        while worker.executor is None:
            await asyncio.sleep(delay)
            try:
                await self._restart(worker)
            except WorkerDown:
                delay = min(delay * 2, 30.0)
        log.info("worker %s is back", worker.pid)

    async def _attempt(self, worker: WorkerProcess, images: list[bytes]) -> list[Outcome] | None:
        """Run a batch; None if the worker died or hung (it has been replaced then)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(worker.submit(images)), self.timeout_s)
        except (BrokenProcessPool, asyncio.TimeoutError) as exc:
            what = "hung" if isinstance(exc, asyncio.TimeoutError) else "died"
            log.error("worker %s %s during a batch of %d images; replacing it", worker.pid, what, len(images))
            await self._restart(worker)
            return None

    async def run(self, worker: WorkerProcess, images: list[bytes]) -> list[Outcome]:
        try:
            outcomes = await self._attempt(worker, images)
            if outcomes is not None:
                return outcomes
            # Isolate the culprit: each image once more, alone, on the fresh worker.
            retried = []
            for data in images:
                single = await self._attempt(worker, [data])
                retried.append(single[0] if single is not None else ("error", 400, CRASHED))
            return retried
        except WorkerDown as exc:
            return [("error", 503, str(exc))] * len(images)

    async def consume(self, index: int, batcher: Batcher, observe: Callable[[int, float], None]) -> None:
        worker = self.processes[index]

        async def revive_if_down() -> None:
            if worker.executor is None:  # down: take no more work until it runs again
                if not self.alive():  # and nobody else will take what waits
                    batcher.fail_all(("error", 503, self.last_error or NO_WORKER))
                await self._revive(worker)

        await _consume(batcher, lambda images: self.run(worker, images), observe, before_take=revive_if_down)
