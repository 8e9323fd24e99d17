"""Asyncio task helpers shared by the workers and the processes that run them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def run_against(work: Awaitable[T], *rivals: Awaitable[object]) -> asyncio.Task[T]:
    """Run ``work`` until it ends, or until one of ``rivals`` ends first: then ``work``
    is cancelled and its cleanup awaited. The rivals still running are cancelled.
    Returns ``work``'s task, done or cancelled."""
    task = asyncio.ensure_future(work)
    others = [asyncio.ensure_future(rival) for rival in rivals]
    try:
        await asyncio.wait({task, *others}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in others:
            other.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return task
