"""Follow a topic whole and keep the latest event per key (a small compacted view).

Every reader gets every partition from the start, without a consumer group, so
each API replica or enricher holds the same view. An event that does not parse
is skipped; a broker error is retried after a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from kontext.settings import Settings
from schemas.events import Event

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)
K = TypeVar("K", bound=Hashable)


class TopicFollower(Generic[K, E]):
    """The latest ``event`` per ``key_of(event)`` on ``topic``, read as it comes."""

    def __init__(
        self, settings: Settings, topic: str, event: type[E], key_of: Callable[[E], K]
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.event = event
        self.key_of = key_of
        self.latest: dict[K, E] = {}
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Follow until ``stopping`` is set."""
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.settings.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            # Nothing here is latency-bound: state and heartbeats arrive every second or so.
            fetch_max_wait_ms=self.settings.kafka_idle_fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            while not stopping.is_set():
                try:
                    fetched = await consumer.getmany(timeout_ms=200)
                except KafkaError as exc:
                    log.warning("%s: %s; retrying", self.topic, exc)
                    await asyncio.sleep(1)
                    continue
                for messages in fetched.values():
                    for message in messages:
                        try:
                            event = self.event.decode(message.value)
                        except (ValidationError, ValueError):
                            continue
                        self.latest[self.key_of(event)] = event
        finally:
            await consumer.stop()

    async def start(self) -> None:
        """Follow in a task of its own, until ``close``."""
        self._task = asyncio.create_task(self.run(self._stopping), name=f"follow-{self.topic}")

    async def close(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
