"""The adaptive micro-batcher: concurrent requests share calls, answers go back to their own requests."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serving.batching import MicroBatcher


class Recorder:
    """A fake model: logits = the input's first pixel times (1, 2); records batch sizes and threads."""

    def __init__(self, fail_when=None):
        self.sizes, self.threads, self.fail_when = [], [], fail_when

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        self.threads.append(threading.get_ident())
        if self.fail_when is not None and (batch[:, 0, 0, 0] == self.fail_when).any():
            raise RuntimeError("boom")
        return batch[:, 0, 0, :1] * np.array([1.0, 2.0], np.float32)


def item(value: float) -> np.ndarray:
    return np.full((1, 2, 2), value, np.float32)


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    model = Recorder()
    batcher = MicroBatcher(model, max_batch_size=8)

    async def main():
        return await asyncio.gather(*(batcher.infer(item(i)) for i in range(20)))

    outputs = asyncio.run(main())
    assert [out.tolist() for out in outputs] == [[i, 2 * i] for i in range(20)]
    # gather() queues all 20 before the consumer first runs: full batches, then the rest.
    assert model.sizes == [8, 8, 4]
    assert list(batcher.batch_sizes) == model.sizes


def test_requests_one_after_another_each_run_alone():
    model = Recorder()
    batcher = MicroBatcher(model)

    async def main():
        return [(await batcher.infer(item(i))).tolist() for i in range(3)]

    assert asyncio.run(main()) == [[0, 0], [1, 2], [2, 4]]
    assert model.sizes == [1, 1, 1]  # nobody was held back waiting for company


def test_a_failing_batch_fails_its_requests_only_and_the_batcher_keeps_serving():
    batcher = MicroBatcher(Recorder(fail_when=3), max_batch_size=4)

    async def main():
        first = await asyncio.gather(*(batcher.infer(item(i)) for i in range(4)), return_exceptions=True)
        later = await batcher.infer(item(7))
        return first, later

    first, later = asyncio.run(main())
    assert all(isinstance(result, RuntimeError) for result in first)
    assert later.tolist() == [7, 14]


@pytest.mark.parametrize("inline_below_ms, inline", [(float("inf"), True), (0.0, False)])
def test_cheap_batches_run_on_the_loop_and_costly_ones_in_a_thread(inline_below_ms, inline):
    model = Recorder()
    batcher = MicroBatcher(model, inline_below_ms=inline_below_ms)

    async def main():
        for i in range(3):
            await batcher.infer(item(i))
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert model.threads[0] != loop_thread  # the first batch, of unknown cost, always goes to a thread
    assert all((thread == loop_thread) == inline for thread in model.threads[1:])
    assert batcher.seconds_per_item is not None and batcher.seconds_per_item > 0
