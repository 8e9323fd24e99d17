"""One holder at a time, interactive callers first: for a model call that already
uses every core, so running two at once only slows both."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    """Grants turns one at a time: waiting interactive callers before background ones,
    each lane in arrival order."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}
        """By ``background``: the callers waiting for a turn."""

    @asynccontextmanager
    async def turn(self, background: bool = False) -> AsyncIterator[None]:
        """Hold the gate for the block; ``background`` callers yield to interactive ones."""
        if self._busy:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting[background].append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed the turn just as it was cancelled: pass it on
                else:
                    self._waiting[background].remove(waiter)
                raise
        self._busy = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Hand the turn to the next waiter (interactive first), or free the gate."""
        for lane in (False, True):
            while self._waiting[lane]:
                waiter = self._waiting[lane].popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return  # still busy: the waiter holds it now
        self._busy = False
