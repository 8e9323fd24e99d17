"""Back-pressure: a worker with a backlog holds a bounded amount of it in memory.

While its handler is busy, a BatchConsumer has drained at most the next batch;
the Kafka client keeps one fetch (``KONTEXT_KAFKA_FETCH_MAX_BYTES``) and asks
for no more until it is consumed. The backlog stays on the broker.
"""

from __future__ import annotations

import asyncio
import os
import tracemalloc
import uuid
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from kontext.app.embedded import EmbeddedBroker
from kontext.connections import create_consumer, ensure_topics
from kontext.settings import Settings
from tests.conftest import wait_for
from workers.consumer import BatchConsumer
from workers.records import Record

MESSAGES = 2000
SIZE = 8 * 1024  # a 16 MB backlog
FETCH_BYTES = 512 * 1024
WINDOW_S = 2.0


class Busy:
    """A handler that takes each batch and works on it until released."""

    name = "busy"

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = asyncio.Event()

    async def handle(self, records: Sequence[Record]) -> None:
        self.sizes.append(len(records))
        await self.release.wait()


async def test_a_backlog_stays_on_the_broker_while_the_worker_is_busy(
    broker: EmbeddedBroker,
) -> None:
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_partitions=2)
    topic = f"backlog-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [topic])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        for i in range(MESSAGES):
            await producer.send(topic, os.urandom(SIZE), key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()

    settings = settings.model_copy(update={"kafka_fetch_max_bytes": FETCH_BYTES})
    consumer = create_consumer(settings, topic, group_id=f"g-{topic}")
    handler = Busy()
    worker = BatchConsumer(consumer, handler, max_size=16, max_wait_ms=20)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: handler.sizes, timeout=60)
        # The handler holds its first batch; watch what the worker buffers meanwhile
        # (WINDOW_S is 40 fetch waits: time enough to pull the whole backlog if it would).
        await asyncio.sleep(WINDOW_S)
        held = tracemalloc.get_traced_memory()[1] - base
        handler.release.set()
        await wait_for(lambda: sum(handler.sizes) >= MESSAGES, timeout=120)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        worker.stop()
        handler.release.set()
        await asyncio.wait_for(task, timeout=30)
    backlog = MESSAGES * SIZE
    # One fetch buffered (the embedded broker applies its bound per partition), two
    # batches in hand; twice that for the client's raw and decoded copies.
    bound = 2 * (settings.topic_partitions * FETCH_BYTES + 2 * 16 * SIZE)
    assert bound < backlog / 4
    assert held < bound, f"held {held} bytes of a {backlog}-byte backlog"
    assert peak < bound, f"peak {peak} bytes while draining a {backlog}-byte backlog"
    assert max(handler.sizes) <= 16
