"""The gate between generation and weight syncs: every response is produced by exactly one weights version.

Generation requests hold the gate *shared* for their whole response (streamed bodies included); a sync
holds it *exclusive* from the trainer's arrival (an armed sync waiting for its trainer does not hold it)
until the new version is recorded. A waiting
sync blocks new generation (so syncs never starve) and waits for running generation to finish (so no
request has tokens from two versions: vLLM's engine core would otherwise run a request's remaining
steps on the new weights once the load RPC returns). A response's version is read while its request
holds the gate, so it names the only weights the engine ran while that request was alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rpc.errors import SyncTimedOut


class WeightsGate:
    """An asyncio readers-writer gate with writer preference (one writer at a time)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._running = 0
        self._sync = False  # a sync holds the gate or waits for running generation to end

    @property
    def running(self) -> int:
        """Generation requests currently holding the gate."""
        return self._running

    @asynccontextmanager
    async def generation(self) -> AsyncIterator[None]:
        """Hold the gate shared (waits while a sync is pending or being applied)."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._sync)
            self._running += 1
        try:
            yield
        finally:
            async with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def sync(self, drain_timeout_s: float) -> AsyncIterator[None]:
        """Hold the gate exclusive; raises `SyncTimedOut` (and lets generation resume) when running
        generation has not finished within `drain_timeout_s`."""
        async with self._cond:
            await self._cond.wait_for(lambda: not self._sync)
            self._sync = True
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self._running == 0), drain_timeout_s)
            except TimeoutError:
                self._sync = False
                self._cond.notify_all()
                raise SyncTimedOut(
                    f"{self._running} generation request(s) still running after {drain_timeout_s:.0f} s; "
                    "the sync did not start (weights unchanged)"
                ) from None
        try:
            yield
        finally:
            async with self._cond:
                self._sync = False
                self._cond.notify_all()
