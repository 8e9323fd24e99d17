"""Several micro-batches in flight, against the real broker: a batch's slot frees up
as it ends, offsets are committed in order, never past a batch that is not done, and
a stop leaves unfinished batches to be delivered again."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kontext.app.embedded import EmbeddedBroker
from kontext.connections import create_consumer, ensure_topics
from kontext.settings import Settings
from tests.conftest import wait_for
from workers.consumer import BatchConsumer
from workers.records import Record

BATCH = 3


class Gated:
    """A handler whose batches each wait for the test to finish (or fail) them."""

    name = "gated"

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Future[None]] = {}
        """First offset of each batch started -> its gate."""
        self.done: list[int] = []

    def gate(self, first: int) -> asyncio.Future[None]:
        return self.gates.setdefault(first, asyncio.get_running_loop().create_future())

    def finish(self, first: int) -> None:
        self.gate(first).set_result(None)

    def fail(self, first: int) -> None:
        self.gate(first).set_exception(RuntimeError(f"batch at {first} failed"))

    async def handle(self, records: Sequence[Record]) -> None:
        first = records[0].offset
        gate = self.gate(first)
        await asyncio.shield(gate)
        self.done.append(first)


class Topic:
    """A one-partition topic, and its consumer group's committed offset."""

    def __init__(self, settings: Settings, name: str, group: str, reader: AIOKafkaConsumer) -> None:
        self.settings = settings
        self.name = name
        self.group = group
        self.reader = reader
        """In the group, but subscribed to nothing: it only reads the committed offset."""

    async def committed(self) -> int | None:
        return await self.reader.committed(TopicPartition(self.name, 0))

    async def reached(self, offset: int) -> bool:
        return await self.committed() == offset

    def worker(self, handler: Gated | Recording, max_in_flight: int) -> BatchConsumer:
        consumer = create_consumer(self.settings, self.name, group_id=self.group)
        return BatchConsumer(
            consumer, handler, max_size=BATCH, max_wait_ms=5000, max_in_flight=max_in_flight
        )


class Recording:
    name = "recording"

    def __init__(self) -> None:
        self.offsets: list[int] = []

    async def handle(self, records: Sequence[Record]) -> None:
        self.offsets.extend(r.offset for r in records)


@pytest.fixture
async def topic(broker: EmbeddedBroker) -> AsyncIterator[Topic]:
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_partitions=1,
        kafka_session_timeout_ms=3000,
        kafka_heartbeat_interval_ms=500,
    )
    name = f"in-flight-{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [name])
    group = f"g-{name}"
    reader = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        yield Topic(settings, name, group, reader)
    finally:
        await reader.stop()


async def _produce(topic: Topic, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=topic.settings.bootstrap)
    await producer.start()
    try:
        for i in range(count):
            await producer.send(topic.name, str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def test_offsets_never_pass_a_batch_that_is_not_done(topic: Topic) -> None:
    await _produce(topic, 4 * BATCH)
    handler = Gated()
    worker = topic.worker(handler, max_in_flight=3)
    task = asyncio.create_task(worker.run())
    try:
        # Three batches at once in the handler; the fourth waits for room.
        await wait_for(lambda: len(handler.gates) == 3, timeout=30)
        assert sorted(handler.gates) == [0, 3, 6]

        handler.finish(3)  # the second batch finishes first
        await wait_for(lambda: handler.done == [3])
        # Its slot is free at once: the fourth starts while the first still runs.
        await wait_for(lambda: 9 in handler.gates, timeout=30)
        assert await topic.committed() is None  # the first is not done

        handler.finish(0)  # now the first two are done; the third is not
        await wait_for(lambda: topic.reached(2 * BATCH), timeout=10)

        handler.finish(9)  # the fourth finishes while the third still runs
        await wait_for(lambda: 9 in handler.done)
        assert await topic.committed() == 2 * BATCH

        handler.finish(6)
        await wait_for(lambda: topic.reached(4 * BATCH), timeout=10)
        assert handler.done == [3, 0, 9, 6]
    finally:
        worker.stop()
        for gate in handler.gates.values():
            if not gate.done():
                gate.set_result(None)
        await asyncio.wait_for(task, timeout=30)


@pytest.mark.parametrize("end", ["fails", "cancelled"])
async def test_a_stop_leaves_unfinished_batches_to_be_delivered_again(
    topic: Topic, end: str
) -> None:
    await _produce(topic, 2 * BATCH)
    handler = Gated()
    worker = topic.worker(handler, max_in_flight=2)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: sorted(handler.gates) == [0, 3], timeout=30)
    handler.finish(3)
    await wait_for(lambda: handler.done == [3])
    worker.stop()
    if end == "fails":
        handler.fail(0)  # the first batch fails while stopping: it gives up, unfinished
        await asyncio.wait_for(task, timeout=30)
    else:
        task.cancel()  # as the runtime does to a worker that does not stop in time
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
    assert await topic.committed() is None  # nothing past the unfinished first batch

    again = Recording()
    worker = topic.worker(again, max_in_flight=2)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(lambda: topic.reached(2 * BATCH), timeout=30)
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=30)
    # Both batches again: the unfinished one and the one done after it.
    assert sorted(again.offsets) == list(range(2 * BATCH))
