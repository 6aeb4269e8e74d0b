"""Adaptive micro-batching: concurrent single-image requests share one onnxruntime call.

Each task has one batcher with one consumer. The consumer takes every image queued so far (at most
``max_batch_size``) and runs them as one batch; images that arrive meanwhile queue up and form the next
batch. Nobody waits for a batch to fill: under light load a batch is one image and runs at once; under
heavy load batches grow by themselves and the cost per image falls. A request therefore waits at most for
the batch that is running when it arrives, plus its own.

A batch expected to take less than ``inline_below_ms`` runs on the event loop itself: for the small MedMNIST
networks a thread hand-off costs more CPU than the onnxruntime call. Longer batches go to a thread so the
loop keeps reading requests (and answering probes) meanwhile. The expectation is a running average of the
measured time per image.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

import numpy as np


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int = 64,
        inline_below_ms: float = 1.0,
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.inline_below_s = inline_below_ms / 1000.0
        self.seconds_per_item: float | None = None  # running average; None until the first batch (run in a thread)
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for /models and the load test

    async def infer(self, item: np.ndarray) -> np.ndarray:
        """Logits for one input [C, H, W]; awaits the batch it joins."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch = [await self._queue.get()]
        await asyncio.sleep(0)  # let requests decoded in this same loop iteration join
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self, batch: np.ndarray) -> np.ndarray:
        expected = None if self.seconds_per_item is None else self.seconds_per_item * len(batch)
        if expected is not None and expected < self.inline_below_s:
            return self._timed_run(batch)
        return await asyncio.to_thread(self._timed_run, batch)

    def _timed_run(self, batch: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        outputs = self.run_batch(batch)
        per_item = (time.perf_counter() - started) / len(batch)
        average = self.seconds_per_item
        self.seconds_per_item = per_item if average is None else 0.9 * average + 0.1 * per_item
        return outputs

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            items, futures = zip(*batch)
            try:
                outputs = await self._run(np.stack(items))
            except Exception as err:  # hand the error to every waiting request, keep serving
                for future in futures:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batch_sizes.append(len(batch))
            for future, output in zip(futures, outputs):
                if not future.done():  # the client may have gone away
                    future.set_result(output)
