"""Adaptive micro-batching: concurrent single-image requests share one onnxruntime call.

Each task has one batcher. The first waiting image opens a window of at most ``max_latency_ms``; the batch
runs when the window closes or ``max_batch_size`` images are queued, whichever is first. Under light load a
request waits only the window; under heavy load batches grow and the per-image cost falls.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np


class MicroBatcher:
    def __init__(
        self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 64, max_latency_ms: float = 5.0
    ):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # recent batch sizes, for /models and the load test

    async def infer(self, item: np.ndarray) -> np.ndarray:
        """Logits for one input [C, H, W]; awaits the batch it joins."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_latency_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items, futures = zip(*batch)
            try:
                outputs = await asyncio.to_thread(self.run_batch, np.stack(items))
            except Exception as err:  # hand the error to every waiting request, keep serving
                for future in futures:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
            for future, output in zip(futures, outputs):
                if not future.done():
                    future.set_result(output)
