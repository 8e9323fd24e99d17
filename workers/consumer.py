"""The micro-batch consume loop shared by the inference worker and the recorder.

Drain up to ``max_size`` records or ``max_wait_ms`` after the first one,
hand them to a handler, commit offsets only once it returns. A failing batch
is retried with capped backoff; the loop never skips work it has not done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer

from workers.records import BatchHandler, Record

log = logging.getLogger(__name__)

POLL_MS = 250


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


class BatchConsumer:
    """Runs one handler over one consumer group until stopped."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        handler: BatchHandler,
        *,
        max_size: int,
        max_wait_ms: int,
    ) -> None:
        self.consumer = consumer
        self.handler = handler
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        await self.consumer.start()
        try:
            while not self.stopping.is_set():
                records = await drain(self.consumer, self.max_size, self.max_wait_ms, self.stopping)
                if not records:
                    continue
                if not await retry_until_done(self.handler, records, self.stopping):
                    break
                await self.consumer.commit()
        finally:
            await self.consumer.stop()

    def stop(self) -> None:
        self.stopping.set()
