"""One holder at a time, interactive callers first: for a model call that already
uses every core, so running two at once only slows both. With a pacer, background
turns are also paced while interactive callers arrive (workers/pacing.py)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from workers.pacing import Pacer


class PriorityGate:
    """Grants turns one at a time: waiting interactive callers before background ones,
    each lane in arrival order."""

    def __init__(self, pacer: Pacer | None = None) -> None:
        self.pacer = pacer
        self._busy = False
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {False: deque(), True: deque()}
        """By ``background``: the callers waiting for a turn."""

    @asynccontextmanager
    async def turn(
        self, background: bool = False, paced: bool | None = None
    ) -> AsyncIterator[None]:
        """Hold the gate for the block; ``background`` callers yield to interactive ones.
        ``paced`` callers (default: background ones) wait for their pacer's turn before
        queueing; an interactive caller tells the pacer interactive work is arriving."""
        paced = background if paced is None else paced
        if self.pacer is not None:
            if paced:
                await self.pacer.wait_for_background()
            elif not background:
                self.pacer.saw_interactive()
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
        started = time.monotonic()
        try:
            yield
        finally:
            self._release()
            if paced and self.pacer is not None:
                self.pacer.ran_background(time.monotonic() - started)

    def waiting(self, background: bool) -> int:
        """How many callers of a lane wait for a turn."""
        return sum(1 for waiter in self._waiting[background] if not waiter.done())

    def _release(self) -> None:
        """Hand the turn to the next waiter (interactive first), or free the gate."""
        for lane in (False, True):
            while self._waiting[lane]:
                waiter = self._waiting[lane].popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return  # still busy: the waiter holds it now
        self._busy = False
