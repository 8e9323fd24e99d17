"""The loop of the services that sweep on a timer (webhook retries, batches, reconciler)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(
    interval_s: float,
    step: Callable[[], Awaitable[object]],
    stopping: asyncio.Event,
    name: str,
    expected: tuple[type[Exception], ...] = (),
) -> None:
    """Run ``step`` every ``interval_s`` seconds until ``stopping`` is set.

    A step that returns True (not merely truthy) runs again at once: more work is
    due. A failing step is logged (one line for an ``expected`` exception, such as
    a database that is down; a traceback otherwise) and the next runs on schedule.
    """
    while not stopping.is_set():
        again = False
        try:
            again = await step() is True
        except expected as exc:
            log.warning("%s failed (%s); next in %ss", name, exc, interval_s)
        except Exception:
            log.exception("%s failed; next in %ss", name, interval_s)
        if again:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)
