"""Asyncio task helpers shared by the workers and the processes that run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable, Iterator
from typing import Any, TypeVar

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


def settle(
    futures: Iterable[asyncio.Future[Any]],
    log: logging.Logger,
    what: str,
    level: int = logging.WARNING,
) -> None:
    """Have each failure of ``futures``, which nothing will await (sends whose delivery
    no one waits for), logged at ``level`` as ``what`` not delivered, rather than
    reported as an exception never retrieved when the future is collected."""

    def retrieve(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.log(level, "%s not delivered: %r", what, exc)

    for future in futures:
        future.add_done_callback(retrieve)


@contextlib.contextmanager
def retrieved_if_failed(
    sends: list[asyncio.Future[Any]], log: logging.Logger, handler: str
) -> Iterator[None]:
    """Around a handler's batch: should it fail, the sends it queued on ``sends`` are
    only retrieved (logged at DEBUG), as the batch runs again whole."""
    try:
        yield
    except BaseException:
        settle(sends, log, f"{handler}: a send of a failed batch", logging.DEBUG)
        raise
