"""Micro-batch limits and priority lanes, against the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from kontext.app.embedded import EmbeddedBroker
from kontext.connections import FetchTempo, ensure_topics
from kontext.settings import Settings
from tests.conftest import wait_for
from workers.consumer import SLOT_CHECK_MS, BatchConsumer, drain, drain_lanes
from workers.pacing import Pacer
from workers.records import Record


async def _lanes(
    broker: EmbeddedBroker, high: int, low: int, start: bool = True
) -> tuple[AIOKafkaConsumer, AIOKafkaConsumer]:
    """An interactive and a background topic holding ``high`` and ``low`` messages, and
    a consumer of each (started, and holding what the broker has, unless not ``start``)."""
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
    if not start:
        return consumers[0], consumers[1]
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
    arrives meanwhile, up to max_size, and is sealed once a slot frees up. It looks
    again when a record arrives or the slot frees up, and otherwise every SLOT_CHECK_MS:
    not every few ms through an engine call of seconds, each look waking the event loop
    and taking the GIL from the engine's thread."""
    high, low = await _lanes(broker, high=1, low=0)
    await low.stop()
    topic = next(iter(high.subscription()))
    counting = CountingConsumer(high)
    stopping, free = asyncio.Event(), asyncio.Event()  # free clear: every slot busy
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        filling = asyncio.create_task(
            drain(counting, 10, 0, stopping, free)  # type: ignore[arg-type]
        )
        await wait_for(lambda: len(counting.waits) >= 2, timeout=10)  # past its wait
        looked = len(counting.waits)
        await asyncio.sleep(1.0)  # a second of an engine call, nothing arriving
        looks = len(counting.waits) - looked
        for i in range(1, 5):
            await producer.send_and_wait(topic, f"{topic}-{i}".encode())
        await wait_for(lambda: high.highwater(TopicPartition(topic, 0)) == 5, timeout=30)
        assert not filling.done()  # its wait (0 ms) is long past, but it had nowhere to go
        free.set()
        batch = await asyncio.wait_for(filling, timeout=10)
    finally:
        await producer.stop()
        await high.stop()
    assert looks <= 1000 // SLOT_CHECK_MS + 1  # about 200 when it looked every 5 ms
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


async def test_a_paused_background_lane_gives_interactive_work_the_whole_batch(
    broker: EmbeddedBroker,
) -> None:
    """While interactive jobs arrive and background work has had its share, a batch takes
    no background work, not even its reserve; once they stop, it takes it again."""
    high, low = await _lanes(broker, high=3, low=20)
    high_topic = next(iter(high.subscription()))
    stopping = asyncio.Event()
    pacer = Pacer(share=0.25, window_s=60)
    pacer.saw_interactive()
    pacer.ran_background(100)  # a 300 s pause
    try:
        paced = await drain_lanes(high, low, 8, 50, 2, stopping, pacer=pacer)
        idle = await drain_lanes(high, low, 8, 50, 2, stopping, pacer=Pacer(0.25, 60))
    finally:
        await high.stop()
        await low.stop()
    assert _lane_counts(paced, high_topic) == (3, 0)
    assert _lane_counts(idle, high_topic) == (0, 8)


class Held:
    """Records each batch; the first ``hold`` wait until the test releases them."""

    name = "held"

    def __init__(self, hold: int = 1) -> None:
        self.batches: list[list[Record]] = []
        self.release = asyncio.Event()
        self.hold = hold

    async def handle(self, records: Sequence[Record]) -> None:
        self.batches.append(list(records))
        if len(self.batches) <= self.hold:
            await self.release.wait()


@contextlib.asynccontextmanager
async def _running(
    broker: EmbeddedBroker, worker: BatchConsumer, handler: Held
) -> AsyncIterator[AIOKafkaProducer]:
    """``worker`` running, and a producer to send it jobs; on leaving, the held batches
    are released and the worker stops."""
    running = asyncio.create_task(worker.run())
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        yield producer
    finally:
        handler.release.set()
        worker.stop()
        await asyncio.wait_for(running, timeout=30)
        await producer.stop()


async def test_background_batches_pause_the_lane_while_interactive_jobs_arrive(
    broker: EmbeddedBroker,
) -> None:
    """The consume loop tells the pacer how long background work ran; the lane then
    pauses while interactive jobs still go through at once."""
    high, low = await _lanes(broker, high=0, low=6, start=False)
    high_topic = next(iter(high.subscription()))
    low_topic = next(iter(low.subscription()))
    pacer = Pacer(share=0.01, window_s=60)
    pacer.saw_interactive()  # interactive jobs are arriving
    handler = Held()
    worker = BatchConsumer(high, handler, max_size=3, max_wait_ms=20, background=low, pacer=pacer)
    async with _running(broker, worker, handler) as producer:
        await wait_for(lambda: len(handler.batches) == 1, timeout=30)
        await asyncio.sleep(0.2)  # the background batch runs 0.2 s: a pause of 19.8 s
        handler.release.set()
        await wait_for(lambda: not pacer.background_may_start(), timeout=10)
        await producer.send_and_wait(high_topic, b"interactive")
        await wait_for(lambda: len(handler.batches) == 2, timeout=30)
    first, second = handler.batches
    assert {r.topic for r in first} == {low_topic}
    # Three background records still wait, yet the interactive job went alone.
    assert [(r.topic, r.value) for r in second] == [(high_topic, b"interactive")]


async def test_background_work_alone_leaves_a_slot_free_for_interactive_jobs(
    broker: EmbeddedBroker,
) -> None:
    """Two batches may run at once (an engine that batches continuously). While
    interactive jobs arrive, a backfill takes one slot, not both: however long its
    batch runs, the next interactive job starts at once, without background work
    beside it; the backfill goes on once its batch is done."""
    high, low = await _lanes(broker, high=0, low=20, start=False)
    high_topic = next(iter(high.subscription()))
    low_topic = next(iter(low.subscription()))
    pacer = Pacer(share=0.9, window_s=60)
    pacer.saw_interactive()  # interactive jobs are arriving
    handler = Held()
    worker = BatchConsumer(
        high, handler, max_size=3, max_wait_ms=20, background=low, pacer=pacer, max_in_flight=2
    )
    async with _running(broker, worker, handler) as producer:
        await wait_for(lambda: len(handler.batches) == 1, timeout=30)
        assert worker.free.is_set() and not worker.background_free.is_set()
        await producer.send_and_wait(high_topic, b"interactive")
        await wait_for(lambda: len(handler.batches) == 2, timeout=30)
        handler.release.set()
        await wait_for(lambda: len(handler.batches) == 3, timeout=30)
    first, second, third = handler.batches[:3]
    assert {r.topic for r in first} == {low_topic}
    assert [(r.topic, r.value) for r in second] == [(high_topic, b"interactive")]
    assert {r.topic for r in third} == {low_topic}


async def test_an_interactive_job_starts_at_once_while_a_backfill_holds_every_slot(
    broker: EmbeddedBroker,
) -> None:
    """A backfill alone takes both slots while no interactive job comes. The first one
    to come after that quiet spell does not wait for either batch to end: it starts
    in a slot of its own, a third."""
    high, low = await _lanes(broker, high=0, low=20, start=False)
    high_topic = next(iter(high.subscription()))
    low_topic = next(iter(low.subscription()))
    handler = Held(hold=2)
    pacer = Pacer(share=0.25, window_s=60)  # no interactive job seen yet
    worker = BatchConsumer(
        high, handler, max_size=3, max_wait_ms=20, background=low, pacer=pacer, max_in_flight=2
    )
    async with _running(broker, worker, handler) as producer:
        await wait_for(lambda: len(handler.batches) == 2, timeout=30)
        assert not worker.free.is_set() and worker.interactive_free.is_set()
        await producer.send_and_wait(high_topic, b"interactive")
        await wait_for(lambda: len(handler.batches) == 3, timeout=30)  # both still held
    first, second, third = handler.batches[:3]
    assert {r.topic for r in first + second} == {low_topic}
    assert (high_topic, b"interactive") in [(r.topic, r.value) for r in third]


async def test_interactive_work_alone_gets_no_slot_more(broker: EmbeddedBroker) -> None:
    """The spare slot is for interactive work behind a backfill: without one running,
    ``max_in_flight`` holds."""
    high, low = await _lanes(broker, high=20, low=0, start=False)
    handler = Held(hold=3)
    pacer = Pacer(share=0.25, window_s=60)
    worker = BatchConsumer(
        high, handler, max_size=3, max_wait_ms=20, background=low, pacer=pacer, max_in_flight=2
    )
    async with _running(broker, worker, handler):
        await wait_for(lambda: len(handler.batches) >= 2, timeout=30)
        assert not worker.free.is_set() and not worker.interactive_free.is_set()
        assert len(handler.batches) == 2


async def test_an_interactive_batch_keeps_the_pacer_active_until_it_ends(
    broker: EmbeddedBroker,
) -> None:
    high, low = await _lanes(broker, high=1, low=0, start=False)
    pacer = Pacer(share=0.25, window_s=30)
    handler = Held()
    worker = BatchConsumer(high, handler, max_size=3, max_wait_ms=0, background=low, pacer=pacer)
    async with _running(broker, worker, handler):
        await wait_for(lambda: len(handler.batches) == 1, timeout=30)
        assert pacer.interactive_active(time.monotonic() + 60)  # held past any window
        handler.release.set()
        await wait_for(lambda: not pacer.interactive_active(time.monotonic() + 60), timeout=10)
        assert pacer.interactive_active()  # the window runs from the batch's end


async def test_fetches_wait_longer_while_a_sealed_batch_waits_for_a_busy_handler(
    broker: EmbeddedBroker,
) -> None:
    """An engine call of seconds: the next batch is full and nothing is taken meanwhile,
    so the consumer's fetch wait lengthens by the quiet rule (not hundreds of empty
    fetches at the short wait); once records flow again, the short wait is back."""
    high, low = await _lanes(broker, high=4, low=0, start=False)
    await low.stop()
    topic = next(iter(high.subscription()))
    handler = Held()
    worker = BatchConsumer(high, handler, max_size=2, max_wait_ms=0, tempo=FetchTempo(5, 200))
    async with _running(broker, worker, handler) as producer:
        await wait_for(lambda: len(handler.batches) == 1, timeout=30)
        fetcher = high._fetcher  # type: ignore[attr-defined]
        # The first batch holds the handler; the second (full) waits. After a second
        # or more of that, a tenth of the quiet: 100 ms or more.
        await wait_for(lambda: fetcher._fetch_max_wait_ms >= 100, timeout=10)
        handler.release.set()
        await wait_for(lambda: len(handler.batches) == 2, timeout=30)
        await producer.send_and_wait(topic, b"next")
        await wait_for(lambda: len(handler.batches) == 3, timeout=30)
        assert fetcher._fetch_max_wait_ms == 5
    assert [len(b) for b in handler.batches] == [2, 2, 1]


class CountingConsumer:
    """The real consumer, with its fetches counted (and their waits kept)."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.waits: list[int] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> object:
        self.waits.append(timeout_ms)
        return await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)


async def test_an_idle_stage_takes_what_has_arrived_and_never_waits_for_more(
    broker: EmbeddedBroker,
) -> None:
    """With no wait configured (the default), the batch is sealed at the first fetch that
    brings records: no second fetch waits for more while a handler slot is free."""
    high, low = await _lanes(broker, high=3, low=0)
    await low.stop()
    later, other = await _lanes(broker, high=3, low=0)
    await other.stop()
    counting = CountingConsumer(high)
    stopping, free = asyncio.Event(), asyncio.Event()
    free.set()
    try:
        batch = await drain(counting, 10, 0, stopping, free)  # type: ignore[arg-type]
        assert len(counting.waits) == 1  # the fetch that brought them; no wait after it
        assert len(batch) == 3
        # A wait configured, the batch waits for more after its first records.
        waited = CountingConsumer(later)
        assert len(await drain(waited, 10, 50, stopping, free)) == 3  # type: ignore[arg-type]
    finally:
        await high.stop()
        await later.stop()
    assert len(waited.waits) >= 2 and 0 < waited.waits[-1] <= 50


async def test_a_quiet_consumer_waits_longer_the_longer_the_quiet(
    broker: EmbeddedBroker,
) -> None:
    """Fetch waits: the short one while records flow, a tenth of the quiet after they
    stop, never past the long one; the next record brings the short one back."""
    clock = [1000.0]
    high, low = await _lanes(broker, high=1, low=0)
    await low.stop()
    tempo = FetchTempo(5, 200, clock=lambda: clock[0])
    fetcher = high._fetcher  # type: ignore[attr-defined]
    waits = []
    try:
        for quiet_s, records in ((0.0, 1), (0.03, 0), (0.5, 0), (1.5, 0), (30, 0)):
            clock[0] = 1000.0 + quiet_s
            tempo.observe(high, records)
            waits.append(fetcher._fetch_max_wait_ms)
        clock[0] += 1
        tempo.observe(high, 1)
        waits.append(fetcher._fetch_max_wait_ms)
    finally:
        await high.stop()
    assert waits == [5, 5, 50, 150, 200, 5]


async def test_a_consumer_under_load_fetches_with_the_busy_wait(broker: EmbeddedBroker) -> None:
    """Records at the busy rate or more: the busy wait (fewer empty fetches between
    bursts); below it, the short wait again; then the quiet rule."""
    clock = [1000.0]
    high, low = await _lanes(broker, high=1, low=0)
    await low.stop()
    tempo = FetchTempo(5, 200, busy_ms=20, busy_rate=200, clock=lambda: clock[0])
    fetcher = high._fetcher  # type: ignore[attr-defined]

    def fetch(after_s: float, records: int) -> int:
        clock[0] += after_s
        tempo.observe(high, records)
        wait: int = fetcher._fetch_max_wait_ms
        return wait

    try:
        # 30 records every 50 ms (600 a second), in bursts with empty fetches between.
        burst = [fetch(0.01, 30 if i % 5 == 0 else 0) for i in range(30)]
        # Then one record every 50 ms (20 a second): a trickle.
        trickle = [fetch(0.05, 1) for _ in range(6)]
        quiet = [fetch(2.0, 0), fetch(10.0, 0)]
    finally:
        await high.stop()
    assert burst[:10] == [5] * 10  # the first window is still being measured
    assert burst[-10:] == [20] * 10
    assert trickle[-3:] == [5, 5, 5]
    assert quiet == [200, 200]
