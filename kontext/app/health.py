"""Liveness of a worker process, for container healthchecks.

While every service of a process is ready, its event loop touches a heartbeat
file every few seconds (``KONTEXT_HEALTH_FILE``). ``kontext health`` passes
only if the file is fresh: a process whose loop is stuck, or that lost a
service, stops touching it and its container is restarted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

BEAT_S = 5.0


async def beat(path: Path, alive: Callable[[], bool], stop: asyncio.Event) -> None:
    """Touch ``path`` every BEAT_S seconds while ``alive()`` holds, until ``stop``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while not stop.is_set():
        if alive():
            await asyncio.to_thread(path.touch)
        try:
            await asyncio.wait_for(stop.wait(), timeout=BEAT_S)
        except TimeoutError:
            pass
    await asyncio.to_thread(path.unlink, missing_ok=True)


def age_s(path: Path) -> float | None:
    """Seconds since the last heartbeat, or None if there is none."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
