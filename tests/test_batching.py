"""Micro-batch limits and priority lanes, against the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kontext.connections import ensure_topics
from kontext.embedded import EmbeddedBroker
from kontext.settings import Settings
from tests.conftest import wait_for
from workers.consumer import drain, drain_lanes


async def _lanes(
    broker: EmbeddedBroker, high: int, low: int
) -> tuple[AIOKafkaConsumer, AIOKafkaConsumer]:
    settings = Settings(kafka_bootstrap_servers=broker.bootstrap_servers, topic_partitions=1)
    name = uuid.uuid4().hex[:8]
    topics = [f"lane-{name}-high", f"lane-{name}-low"]
    await ensure_topics(settings, topics)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        for topic, count in zip(topics, (high, low), strict=True):
            for i in range(count):
                await producer.send(topic, f"{topic}-{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()
    consumers = tuple(
        AIOKafkaConsumer(
            topic,
            bootstrap_servers=broker.bootstrap_servers,
            group_id=f"g-{topic}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            session_timeout_ms=3000,
            heartbeat_interval_ms=500,
        )
        for topic in topics
    )
    for consumer in consumers:
        await consumer.start()

    def fetched() -> bool:  # both lanes hold what the broker has (as in steady state)
        return all(
            c.assignment() and all(c.highwater(tp) is not None for tp in c.assignment())
            for c in consumers
        )

    await wait_for(fetched, timeout=30)
    return consumers[0], consumers[1]


def _lane_counts(records: list, high_topic: str) -> tuple[int, int]:
    high = sum(1 for r in records if r.topic == high_topic)
    return high, len(records) - high


async def test_background_keeps_its_share_and_neither_lane_starves(broker: EmbeddedBroker) -> None:
    high, low = await _lanes(broker, high=40, low=6)
    stopping = asyncio.Event()
    high_topic = next(iter(high.subscription()))
    seen: list[str] = []
    shapes = []
    try:
        while len(seen) < 46:
            batch = await drain_lanes(high, low, 8, 50, 2, stopping)
            assert 0 < len(batch) <= 8
            shapes.append(_lane_counts(batch, high_topic))
            seen.extend(r.value.decode() for r in batch)
    finally:
        await high.stop()
        await low.stop()
    # While both lanes have work: 6 interactive + 2 background in every full batch.
    assert shapes[0] == (6, 2)
    assert shapes[1] == (6, 2)
    # Every message exactly once, each lane in its own order.
    assert len(seen) == len(set(seen)) == 46
    highs = [s for s in seen if "-high-" in s]
    assert highs == sorted(highs, key=lambda s: int(s.rsplit("-", 1)[1]))
    # Once the background lane is empty, interactive takes whole batches.
    assert (8, 0) in shapes


async def test_background_takes_whole_batches_when_interactive_is_idle(
    broker: EmbeddedBroker,
) -> None:
    high, low = await _lanes(broker, high=0, low=20)
    stopping = asyncio.Event()
    try:
        # The first fetch may only see part of the backlog; a full batch comes next.
        sizes = [len(await drain_lanes(high, low, 8, 100, 2, stopping)) for _ in range(3)]
    finally:
        await high.stop()
        await low.stop()
    assert sum(sizes) == 20
    assert max(sizes) == 8


async def test_a_batch_never_exceeds_max_size_nor_waits_past_max_wait(
    broker: EmbeddedBroker,
) -> None:
    high, low = await _lanes(broker, high=3, low=0)
    await low.stop()
    stopping = asyncio.Event()
    try:
        first = await drain(high, 2, 5000, stopping)
        assert len(first) == 2  # full: returned without waiting for more
        started = time.monotonic()
        second = await drain(high, 10, 300, stopping)
        waited = time.monotonic() - started
    finally:
        await high.stop()
    assert len(second) == 1
    # Not full: it waited for more, but no longer than max_wait (plus one poll).
    assert waited < 5.0


async def test_a_batch_keeps_filling_while_every_handler_slot_is_busy(
    broker: EmbeddedBroker,
) -> None:
    """Past its wait, a batch that could not start anyway (the engine is busy) takes what
    arrives meanwhile, up to max_size, and is sealed once a slot frees up."""
    high, low = await _lanes(broker, high=1, low=0)
    await low.stop()
    topic = next(iter(high.subscription()))
    stopping, free = asyncio.Event(), asyncio.Event()  # free clear: every slot busy
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        filling = asyncio.create_task(drain(high, 10, 0, stopping, free))
        for i in range(1, 5):
            await producer.send_and_wait(topic, f"{topic}-{i}".encode())
        await wait_for(lambda: high.highwater(TopicPartition(topic, 0)) == 5, timeout=30)
        assert not filling.done()  # its wait (0 ms) is long past, but it had nowhere to go
        free.set()
        batch = await asyncio.wait_for(filling, timeout=10)
    finally:
        await producer.stop()
        await high.stop()
    assert [r.value for r in batch] == [f"{topic}-{i}".encode() for i in range(5)]


async def test_interactive_work_arriving_while_busy_still_makes_the_next_batch(
    broker: EmbeddedBroker,
) -> None:
    """While the batch waits for a free slot, background work holds only its reserve;
    interactive jobs that arrive meanwhile get the rest, and the batch is sealed
    without more background work (small, so quick to run)."""
    high, low = await _lanes(broker, high=0, low=20)
    high_topic = next(iter(high.subscription()))
    stopping, free = asyncio.Event(), asyncio.Event()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        filling = asyncio.create_task(drain_lanes(high, low, 8, 0, 2, stopping, free))
        for i in range(3):
            await producer.send_and_wait(high_topic, f"{high_topic}-{i}".encode())
        await wait_for(lambda: high.highwater(TopicPartition(high_topic, 0)) == 3, timeout=30)
        assert not filling.done()
        free.set()
        batch = await asyncio.wait_for(filling, timeout=10)
    finally:
        await producer.stop()
        await high.stop()
        await low.stop()
    assert _lane_counts(batch, high_topic) == (3, 2)
