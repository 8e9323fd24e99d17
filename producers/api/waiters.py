"""Long-poll support: wake requests waiting on a job when Postgres says it turned final.

One connection LISTENs on ``kontext_job_final`` (a trigger on ``jobs`` notifies
it with the job id); each waiter re-reads its job when woken, and at least
every ``RECHECK_S`` in case the connection was lost and a notification missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from uuid import UUID

from kontext.listen import listen_forever

log = logging.getLogger(__name__)

CHANNEL = "kontext_job_final"
RECHECK_S = 2.0


class JobWaiters:
    """Events keyed by job id, set by notifications on one listening connection."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._events: dict[UUID, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        listening = listen_forever(self.dsn, CHANNEL, self._notified, self._wake_all, "long-poll")
        self._task = asyncio.create_task(listening, name="job-waiters")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def watch(self, job_id: UUID) -> Iterator[asyncio.Event]:
        """An event set whenever ``job_id`` may have turned final, while in the block."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            job_id = UUID(payload)
        except ValueError:
            return
        for event in self._events.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()
