"""A workaround for a BentoML 1.4 defect that every request pays for; delete it once BentoML fixes it.

BentoML's ``TimeoutMiddleware`` arms a timer for each request (``loop.call_later(timeout, ...)``) and never
disarms it, so every request leaves a timer handle, a future, a context and a bound method alive for the
whole timeout (60 s by default). At a few thousand requests/s that is ~600k live objects per worker: the
worker's memory grows by ~70 MB and each full garbage collection stops it for ~250 ms, which becomes the
p99 latency. This subclass is the same middleware with the timer cancelled when the request is done.
"""

from __future__ import annotations

import asyncio
import logging

import bentoml
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)
PATCHED_VERSIONS = ("1.4.",)  # the versions whose TimeoutMiddleware this copies


class DisarmedTimeoutMiddleware(traffic.TimeoutMiddleware):
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, _send))
        try:
            await waiter  # resolves when the response starts, or fails when the timer fires first
        except asyncio.TimeoutError:
            if task.cancel():
                message = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(message, status_code=504)(scope, receive, send)
        else:
            await task
        finally:
            timer.cancel()  # the one line upstream lacks


def apply() -> bool:
    """Install the fixed middleware (BentoML imports it from this module when it builds each app)."""
    if not bentoml.__version__.startswith(PATCHED_VERSIONS):
        logger.warning("BentoML %s: TimeoutMiddleware left as it is (patch written for 1.4)", bentoml.__version__)
        return False
    traffic.TimeoutMiddleware = DisarmedTimeoutMiddleware
    return True
