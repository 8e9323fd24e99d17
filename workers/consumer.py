"""The micro-batch consume loop shared by the inference worker and the recorder.

Drain up to ``max_size`` records or ``max_wait_ms`` after the first one,
hand them to a handler, commit offsets only once it returns. A failing batch
is retried with capped backoff; the loop never skips work it has not done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from kontext.metrics import observe_lag
from workers.records import BatchHandler, Record

log = logging.getLogger(__name__)

POLL_MS = 250
IDLE_POLL_MS = 50


async def retry_until_done(
    handler: BatchHandler, records: Sequence[Record], stopping: asyncio.Event
) -> bool:
    """Run the handler until it succeeds; False if asked to stop first (batch not done)."""
    delay = 0.1
    while True:
        try:
            await handler.handle(records)
            return True
        except Exception:
            log.exception(
                "%s: batch of %d failed, retrying in %.1fs", handler.name, len(records), delay
            )
        try:
            await asyncio.wait_for(stopping.wait(), timeout=delay)
            return False
        except TimeoutError:
            delay = min(delay * 2, 5.0)


async def drain(
    consumer: AIOKafkaConsumer, max_size: int, max_wait_ms: int, stopping: asyncio.Event
) -> list[Record]:
    """The next micro-batch: waits for a first record, then up to max_wait_ms for more."""
    batch: list[Record] = []
    deadline = 0.0
    while len(batch) < max_size:
        if not batch:
            if stopping.is_set():
                return batch
            timeout_ms = POLL_MS
        else:
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            if timeout_ms <= 0:
                break
        fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_size - len(batch))
        for messages in fetched.values():
            batch.extend(Record(m.topic, m.partition, m.offset, m.key, m.value) for m in messages)
        if batch and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
    return batch


async def _fetch(consumer: AIOKafkaConsumer, timeout_ms: int, room: int) -> list[Record]:
    if room <= 0:
        return []
    fetched = await consumer.getmany(timeout_ms=max(timeout_ms, 0), max_records=room)
    return [
        Record(m.topic, m.partition, m.offset, m.key, m.value)
        for messages in fetched.values()
        for m in messages
    ]


async def drain_lanes(
    interactive: AIOKafkaConsumer,
    background: AIOKafkaConsumer,
    max_size: int,
    max_wait_ms: int,
    reserve: int,
    stopping: asyncio.Event,
) -> list[Record]:
    """The next micro-batch across two priority lanes.

    Background work gets up to ``reserve`` slots of every batch (its guaranteed
    share); interactive work gets the rest, and the reserve too when no
    background work waits; background fills whatever interactive leaves empty.
    Only records that go into the batch are fetched, so committing both
    consumers' positions afterwards never skips one.
    """
    high: list[Record] = []
    low: list[Record] = []
    deadline = 0.0
    while True:
        room = max_size - len(high) - len(low)
        if room <= 0:
            break
        low += await _fetch(background, 0, min(room, reserve - len(low)))
        if (high or low) and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
        if deadline:
            wait_ms = int((deadline - time.monotonic()) * 1000)
        elif stopping.is_set():
            break
        else:
            wait_ms = IDLE_POLL_MS
        got = await _fetch(interactive, wait_ms, max_size - len(high) - len(low))
        high += got
        if not got:
            low += await _fetch(background, 0, max_size - len(high) - len(low))
        if (high or low) and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
        if deadline and time.monotonic() >= deadline:
            break
    return high + low


class BatchConsumer:
    """Runs one handler over one consumer group (or two priority lanes) until stopped."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        handler: BatchHandler,
        *,
        max_size: int,
        max_wait_ms: int,
        background: AIOKafkaConsumer | None = None,
        background_share: float = 0.25,
    ) -> None:
        """With ``background``, ``consumer`` is the interactive lane and background work
        keeps ``background_share`` of each batch."""
        self.consumer = consumer
        self.background = background
        self.handler = handler
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self.reserve = max(1, math.ceil(max_size * background_share))
        self.stopping = asyncio.Event()

    @property
    def consumers(self) -> list[AIOKafkaConsumer]:
        return [self.consumer] + ([self.background] if self.background else [])

    async def _next_batch(self) -> list[Record]:
        if self.background is None:
            return await drain(self.consumer, self.max_size, self.max_wait_ms, self.stopping)
        return await drain_lanes(
            self.consumer,
            self.background,
            self.max_size,
            self.max_wait_ms,
            self.reserve,
            self.stopping,
        )

    async def run(self) -> None:
        """Handle batch after batch; the next batch is drained while the handler
        works on this one, so the engine never waits on Kafka when work is queued."""
        for consumer in self.consumers:
            await consumer.start()
        upcoming: asyncio.Task[list[Record]] | None = None
        try:
            while not self.stopping.is_set():
                records = await (upcoming or self._next_batch())
                upcoming = None
                if not records:
                    continue
                upcoming = asyncio.create_task(self._next_batch())
                if not await retry_until_done(self.handler, records, self.stopping):
                    break
                await self._commit(records)
        finally:
            if upcoming is not None:
                # Drained but not handled: left uncommitted, so it is delivered again.
                upcoming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upcoming
            for consumer in self.consumers:
                await consumer.stop()

    async def _commit(self, records: Sequence[Record]) -> None:
        """Commit exactly past ``records`` (the consumers may have read further ahead)."""
        ends: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            ends[tp] = max(ends.get(tp, 0), record.offset + 1)
        for consumer in self.consumers:
            mine = {tp: offset for tp, offset in ends.items() if tp in consumer.assignment()}
            if mine:
                await consumer.commit(mine)
            for tp, end in mine.items():
                observe_lag(self.handler.name, tp.topic, tp.partition, consumer.highwater(tp), end)

    def ready(self) -> bool:
        """Every lane has its partitions."""
        return all(consumer.assignment() for consumer in self.consumers)

    def stop(self) -> None:
        self.stopping.set()
