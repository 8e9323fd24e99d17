"""Background pacing: while interactive jobs are arriving, background work runs only
its share of the time, so an interactive job finds the cores free.

Model calls cannot be interrupted, and on a machine whose cores every call uses,
an interactive job that lands during a background call waits for it, and runs
slower beside it. Priority queues alone cannot help: they only order the work
that is waiting. So for ``window_s`` after each interactive job a stage sees,
each stretch of background work of ``d`` seconds is followed by a pause of
``d * (1 - share) / share`` in which no background work starts (interactive work
does). An interactive job counts as arriving until its engine batch ends: a job
that waits longer than the window still holds background work back. With no
interactive job for ``window_s``, background work runs flat out again: a backfill
on an idle deployment loses nothing.

One pacer per process, shared by its stages (they share its cores).
"""

from __future__ import annotations

import asyncio
import math
import time

from kontext.metrics import BACKGROUND_PAUSED


def background_reserve(max_size: int, share: float) -> int:
    """Background work's guaranteed slots of a batch of ``max_size`` (at least one), and
    the most it takes in one call while interactive jobs arrive."""
    return max(1, math.ceil(max_size * share))


class Pacer:
    """Paces background work in one process while interactive work is arriving."""

    def __init__(self, share: float, window_s: float) -> None:
        """``share``: the fraction of the time background work may run while interactive
        jobs arrive (1 or a ``window_s`` of 0: no pacing)."""
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self.window_s = window_s
        self._last_interactive = -float("inf")
        self._running = 0
        """Engine batches with interactive jobs in them, running in this process."""
        self._resume_at = -float("inf")
        self._changed = asyncio.Event()
        """Set when an interactive job or a pause changes when background work may run."""

    @property
    def enabled(self) -> bool:
        return self.share < 1 and self.window_s > 0

    def saw_interactive(self) -> None:
        """An interactive job reached a stage of this process."""
        self._last_interactive = time.monotonic()
        self._changed.set()

    def interactive_began(self) -> None:
        """An engine batch with interactive jobs in it started."""
        self._running += 1
        self.saw_interactive()

    def interactive_ended(self) -> None:
        """That batch ended: the window runs from now."""
        self._running -= 1
        self.saw_interactive()

    def interactive_active(self, now: float | None = None) -> bool:
        """Whether an interactive job is running, or arrived within the window."""
        now = time.monotonic() if now is None else now
        recent = self._running > 0 or now - self._last_interactive < self.window_s
        return self.enabled and recent

    def background_may_start(self) -> bool:
        """Whether background work may start now."""
        now = time.monotonic()
        return not self.interactive_active(now) or now >= self._resume_at

    def ran_background(self, seconds: float) -> None:
        """Background work just ran for ``seconds``: pause it if interactive jobs arrive."""
        if not self.enabled:
            return
        now = time.monotonic()
        resume_at = now + seconds * (1 - self.share) / self.share
        if resume_at > self._resume_at:
            if self.interactive_active(now):  # counted while it holds work back
                BACKGROUND_PAUSED.inc(resume_at - max(self._resume_at, now))
            self._resume_at = resume_at
        self._changed.set()

    async def wait_for_background(self) -> None:
        """Return once background work may start (at once when not paced)."""
        while not self.background_may_start():
            now = time.monotonic()
            # Until the pause ends or the interactive window closes, whichever is first;
            # woken early when either moves (a running interactive batch keeps it open).
            until = self._resume_at
            if not self._running:
                until = min(until, self._last_interactive + self.window_s)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(until - now, 0.001))
            except TimeoutError:
                pass
