"""The loop of the services that sweep on a timer, or sooner when woken (webhook
deliveries, batches, reconciler)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(
    interval_s: float,
    step: Callable[[], Awaitable[object]],
    stopping: asyncio.Event,
    name: str,
    expected: tuple[type[Exception], ...] = (),
    wake: asyncio.Event | None = None,
) -> None:
    """Run ``step`` every ``interval_s`` seconds until ``stopping`` is set, and at once
    whenever ``wake`` is set (work arrived: a Postgres NOTIFY, say).

    A step that returns True (not merely truthy) runs again at once: more work is
    due. A failing step is logged (one line for an ``expected`` exception, such as
    a database that is down; a traceback otherwise) and the next runs on schedule.
    """
    while not stopping.is_set():
        if wake is not None:
            wake.clear()
        again = False
        try:
            again = await step() is True
        except expected as exc:
            log.warning("%s failed (%s); next in %ss", name, exc, interval_s)
        except Exception:
            log.exception("%s failed; next in %ss", name, interval_s)
        if again:
            continue
        waits = [asyncio.ensure_future(stopping.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
