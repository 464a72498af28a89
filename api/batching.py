"""Micro-batching: concurrent requests for one model share a forward pass, run off the event loop.

Requests wait in a bounded asyncio queue. One collector takes the first, then keeps taking until `max_batch`
images or `max_wait_ms` have passed, groups them by (model, samples), and runs each group on a single inference
thread. Predictors give each image a result independent of its batch company, so batching changes latency only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from api.errors import Busy

Key = tuple[str, int | None]
Runner = Callable[[Key, Tensor], Any]


@dataclass
class Job:
    """One request's images and the future its handler awaits."""

    key: Key
    images: Tensor
    future: asyncio.Future[Any]


@dataclass
class BatchStats:
    """Hooks the metrics module fills: called with the batch size and the queue depth."""

    on_batch: Callable[[int], None] = lambda n: None
    on_queue: Callable[[int], None] = lambda n: None


class MicroBatcher:
    """Collects jobs into batches and runs `runner(key, images)` on one worker thread."""

    def __init__(self, runner: Runner, *, max_batch: int, max_wait_ms: float, queue_size: int,
                 stats: BatchStats | None = None) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        self.stats = stats or BatchStats()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoo-inference")
        self._task: asyncio.Task[None] | None = None
        self._carry: Job | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="zoo-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, key: Key, images: Tensor) -> Any:
        """Queue the images and wait for their slice of a batch's Prediction; a full queue is a 503."""
        job = Job(key, images, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"the inference queue is full ({self.queue.maxsize} requests); retry shortly") from None
        self.stats.on_queue(self.queue.qsize())
        return await job.future

    async def _next_batch(self) -> list[Job]:
        first = self._carry if self._carry is not None else await self.queue.get()
        self._carry = None
        batch, count = [first], len(first.images)
        deadline = time.perf_counter() + self.max_wait
        while count < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self.queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self.queue.get(),
                                                                                           remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if count + len(job.images) > self.max_batch:
                self._carry = job  # it starts the next batch; a batch never exceeds max_batch unless one job does
                break
            batch.append(job)
            count += len(job.images)
        self.stats.on_queue(self.queue.qsize())
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            groups: dict[Key, list[Job]] = {}
            for job in batch:
                if not job.future.done():  # a client that went away is not computed for
                    groups.setdefault(job.key, []).append(job)
            for key, jobs in groups.items():
                images = torch.cat([j.images for j in jobs])
                self.stats.on_batch(len(images))
                try:
                    result = await loop.run_in_executor(self.executor, self.runner, key, images)
                except Exception as err:  # handed to each waiting request, which answers with an error body
                    for j in jobs:
                        if not j.future.done():
                            j.future.set_exception(err)
                    continue
                start = 0
                for j in jobs:
                    n = len(j.images)
                    if not j.future.done():
                        j.future.set_result(slice_prediction(result, start, start + n))
                    start += n


def slice_prediction(pred: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a Prediction (all tensor fields are per image)."""
    import dataclasses

    return dataclasses.replace(
        pred, probs=pred.probs[start:stop], entropy=pred.entropy[start:stop],
        expected_entropy=pred.expected_entropy[start:stop], mutual_information=pred.mutual_information[start:stop],
    )
