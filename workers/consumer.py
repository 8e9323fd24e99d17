"""The micro-batch consume loop of every consumer service (enricher, inference,
recorder).

Drain up to ``max_size`` records or ``max_wait_ms`` after the first one (longer
while every handler slot is busy: the batch could not start anyway, so it keeps
filling until one frees up), hand them to a handler, commit offsets only once it
returns. While a sealed batch waits for a busy handler, the consumers' fetch waits
lengthen with that wait, as in a quiet stack. A failing batch
is retried with capped backoff; the loop never skips work it has not done.
With several batches in flight, a slot frees up as its batch ends, and offsets are
committed in order, never past a batch that is not done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from kontext.connections import FetchTempo
from kontext.metrics import observe_lag
from kontext.tasks import run_against
from workers.pacing import Pacer, background_reserve
from workers.records import BatchHandler, Flushing, Record

log = logging.getLogger(__name__)

POLL_MS = 250
IDLE_POLL_MS = 50
SLOT_CHECK_MS = 100
"""Past its wait, a batch that cannot start (every handler slot busy) takes records as
they arrive and starts as soon as a slot frees up; it is woken by either, and at the
latest this often: not every few ms through an engine call, each look waking the event
loop and taking the GIL from the engine's thread."""
REST_CHECK_S = 0.1
"""While a sealed batch waits for a busy handler (an engine call), how often the
consumers' fetch waits are brought up to date: nothing is taken meanwhile, so they
lengthen with the wait by the quiet rule, instead of fetching at the short wait
through a call of seconds."""
MAX_UNCOMMITTED_BATCHES = 64
"""Batches in hand at most, running or done but not yet committed: a slot frees up as
its batch ends, but offsets wait for every batch before it, and a long batch at the
head may hold many finished ones behind it."""
COMMIT_INTERVAL_S = 0.2
"""Offsets of finished batches are committed at most this often, and at once when the
consumer stops. A commit is a broker round trip costing about as much as tens of
records, and a stage under load finishes a batch every few tens of ms; a crash
delivers at most this much more work again, which every consumer handles
idempotently."""


@dataclass
class Handling:
    """A batch handed to the handler: its records and its retry_until_done task."""

    records: list[Record]
    task: asyncio.Task[bool]


InFlight = deque[Handling]
"""Batches in hand, oldest first: running, or done and waiting to be committed."""


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


def _can_start(free: asyncio.Event | None, stopping: asyncio.Event) -> bool:
    return free is None or free.is_set() or stopping.is_set()


async def _fetch_until_slot(
    consumer: AIOKafkaConsumer,
    room: int,
    free: asyncio.Event | None,
    stopping: asyncio.Event,
    tempo: FetchTempo | None = None,
) -> list[Record]:
    """What arrives within SLOT_CHECK_MS, or until ``free`` is set (a handler slot frees
    up) or the consumer stops, whichever comes first. A fetch cancelled while it waits
    has taken nothing (the records stay buffered), so none is lost."""
    slot = (e.wait() for e in (free, stopping) if e is not None)
    fetch = await run_against(_fetch(consumer, SLOT_CHECK_MS, room, tempo), *slot)
    if not fetch.cancelled():
        return fetch.result()
    return await _fetch(consumer, 0, room, tempo)  # what arrived meanwhile


async def drain(
    consumer: AIOKafkaConsumer,
    max_size: int,
    max_wait_ms: int,
    stopping: asyncio.Event,
    free: asyncio.Event | None = None,
    tempo: FetchTempo | None = None,
) -> list[Record]:
    """The next micro-batch: waits for a first record, then up to max_wait_ms for more,
    and on while ``free`` (a handler slot is free) is clear."""
    batch: list[Record] = []
    deadline = 0.0
    while len(batch) < max_size:
        room = max_size - len(batch)
        if not batch:
            if stopping.is_set():
                return batch
            batch += await _fetch(consumer, POLL_MS, room, tempo)
        elif (timeout_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            batch += await _fetch(consumer, timeout_ms, room, tempo)
        elif _can_start(free, stopping):
            break
        else:
            batch += await _fetch_until_slot(consumer, room, free, stopping, tempo)
        if batch and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
    return batch


async def _fetch(
    consumer: AIOKafkaConsumer, timeout_ms: int, room: int, tempo: FetchTempo | None = None
) -> list[Record]:
    if room <= 0:
        return []
    fetched = await consumer.getmany(timeout_ms=max(timeout_ms, 0), max_records=room)
    if tempo is not None:
        tempo.observe(consumer, sum(map(len, fetched.values())))
    return [
        Record(m.topic, m.partition, m.offset, m.key, m.value, m.headers)
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
    free: asyncio.Event | None = None,
    pacer: Pacer | None = None,
    tempo: FetchTempo | None = None,
    background_free: asyncio.Event | None = None,
    interactive_free: asyncio.Event | None = None,
) -> list[Record]:
    """The next micro-batch across two priority lanes.

    Background work always gets up to ``reserve`` slots of a batch (its guaranteed
    share); interactive work gets the rest. Background work takes more only for a
    batch without interactive work that can start now (``free`` set: a handler slot
    is free): it fills the batch at once when the handler is idle, or when the batch
    is sealed. So while the handler is busy the batch keeps room for interactive jobs
    that arrive meanwhile, and a batch carrying one stays small (quick to run).
    Only records that go into the batch are fetched, so committing both consumers'
    positions afterwards never skips one. With a ``pacer``, while interactive jobs
    arrive background work takes only its reserve, and none while the pacer pauses it
    or while ``background_free`` is clear (the only free slot is the one kept for
    interactive work). A batch carrying interactive work can start while
    ``interactive_free`` is set (``free`` when None): it may have a slot more.
    """
    high: list[Record] = []
    low: list[Record] = []
    deadline = 0.0

    def take_background(can_start: bool) -> bool:
        """Whether to take background work now. While interactive jobs arrive, only
        for a batch that can start now, so that the time the batch before it took
        has paused the lane by then."""
        if pacer is None or not pacer.interactive_active():
            return True
        kept = not _can_start(background_free, stopping)
        return can_start and not kept and pacer.background_may_start()

    def background_room() -> int:
        """Background work beyond its reserve: none while interactive jobs arrive, so
        each background engine call stays short."""
        paced = pacer is not None and pacer.interactive_active()
        return (reserve if paced else max_size) - len(low)

    while True:
        room = max_size - len(high) - len(low)
        if room <= 0:
            break
        can_start = _can_start(free, stopping)
        if take_background(can_start):
            low += await _fetch(background, 0, min(room, reserve - len(low)), tempo)
        if (high or low) and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
        can_start = _can_start((interactive_free or free) if high else free, stopping)
        past = bool(deadline) and time.monotonic() >= deadline
        if past and can_start:
            if not high and take_background(can_start):
                low += await _fetch(background, 0, background_room(), tempo)
            break
        room = max_size - len(high) - len(low)
        if past:
            slot = (interactive_free or free) if high else free
            arrived = await _fetch_until_slot(interactive, room, slot, stopping, tempo)
        elif deadline:
            wait_ms = int((deadline - time.monotonic()) * 1000)
            arrived = await _fetch(interactive, wait_ms, room, tempo)
        elif stopping.is_set():
            break
        else:
            arrived = await _fetch(interactive, IDLE_POLL_MS, room, tempo)
        if arrived and pacer is not None:
            pacer.saw_interactive()
        high += arrived
        if not high and can_start and take_background(can_start):
            low += await _fetch(background, 0, background_room(), tempo)
        if (high or low) and not deadline:
            deadline = time.monotonic() + max_wait_ms / 1000
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
        max_in_flight: int = 1,
        pacer: Pacer | None = None,
        tempo: FetchTempo | None = None,
    ) -> None:
        """With ``background``, ``consumer`` is the interactive lane and background work
        keeps ``background_share`` of each batch; ``pacer`` paces that work while
        interactive jobs arrive, and is told how long it ran and which batches carry
        interactive jobs. Up to ``max_in_flight`` batches are handled at once (for an
        engine that merges concurrent calls, such as vLLM); while interactive jobs
        arrive, background work alone leaves one of them free for interactive work, so
        a backfill whose batches run long never holds every slot. With more than one
        slot and two lanes, a batch carrying interactive work may take one slot more
        while a batch of background work alone runs: the first interactive job after
        a quiet spell does not wait for a slot a backfill took meanwhile.
        ``tempo`` sets the consumers' fetch waits by whether records flow."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.consumer = consumer
        self.background = background
        self.handler = handler
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self.max_in_flight = max_in_flight
        self.spare = max_in_flight > 1 and background is not None
        """Whether interactive work may take a slot more while background work runs."""
        self._backfilling = 0
        """Batches of background work alone running now."""
        self.reserve = background_reserve(max_size, background_share)
        self.pacer = pacer
        self.tempo = tempo
        self.stopping = asyncio.Event()
        self.free = asyncio.Event()
        """Set while fewer than ``max_in_flight`` batches are running."""
        self.background_free = asyncio.Event()
        """Set while a slot is free besides the one kept for interactive work (with a
        single slot, none is kept)."""
        self.interactive_free = asyncio.Event()
        """Set while a batch carrying interactive work may start."""
        self._slots_taken(0)
        self._uncommitted: dict[TopicPartition, int] = {}
        """Offsets past finished batches, not committed yet."""
        self._committed_at = 0.0
        self._committing = asyncio.Lock()
        self._commit_later: asyncio.Task[None] | None = None

    def _slots_taken(self, taken: int) -> None:
        """Set or clear the slot events for ``taken`` batches running."""
        for event, slots in (
            (self.free, self.max_in_flight),
            (self.background_free, max(1, self.max_in_flight - 1)),
            (self.interactive_free, self._interactive_slots()),
        ):
            if taken < slots:
                event.set()
            else:
                event.clear()

    @property
    def consumers(self) -> list[AIOKafkaConsumer]:
        return [self.consumer] + ([self.background] if self.background else [])

    async def _next_batch(self) -> list[Record]:
        if self.background is None:
            return await drain(
                self.consumer, self.max_size, self.max_wait_ms, self.stopping, self.free, self.tempo
            )
        return await drain_lanes(
            self.consumer,
            self.background,
            self.max_size,
            self.max_wait_ms,
            self.reserve,
            self.stopping,
            self.free,
            self.pacer,
            self.tempo,
            self.background_free,
            self.interactive_free,
        )

    async def run(self) -> None:
        """Handle batch after batch, up to ``max_in_flight`` at once, committing in order.

        The next batch is drained while the handler works, so the engine never waits
        on Kafka when work is queued. A slot frees up as its batch ends; offsets are
        committed only past batches that are done and have no unfinished batch before
        them. Once stopped, no batch starts; those in flight finish (and are
        committed) or give up, and a batch that gave up stays uncommitted with every
        batch after it (delivered again).
        """
        for consumer in self.consumers:
            await consumer.start()
        in_flight: InFlight = deque()
        upcoming: asyncio.Task[list[Record]] | None = None
        try:
            while not self.stopping.is_set():
                if upcoming is None:
                    upcoming = asyncio.create_task(self._next_batch())
                running = {h.task for h in in_flight if not h.task.done()}
                waits: set[asyncio.Future[Any]] = set(running)
                if not upcoming.done() or self._room(in_flight, len(running), upcoming.result()):
                    waits.add(upcoming)  # to know when it is sealed, or to start it
                resting = upcoming not in waits and self.tempo is not None
                done, _ = await asyncio.wait(
                    waits,
                    timeout=REST_CHECK_S if resting else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done and self.tempo is not None:
                    for consumer in self.consumers:
                        self.tempo.observe(consumer, 0)
                if not await self._commit_done(in_flight):
                    return
                running_now = sum(1 for h in in_flight if not h.task.done())
                self._slots_taken(running_now)
                if upcoming.done() and self._room(in_flight, running_now, upcoming.result()):
                    records, upcoming = upcoming.result(), None
                    if records:
                        in_flight.append(self._start(records))
                        self._slots_taken(running_now + 1)
            while in_flight:
                await asyncio.wait([in_flight[0].task])
                if not await self._commit_done(in_flight):
                    return
            if isinstance(self.handler, Flushing):
                await self.handler.flush()
        finally:
            # Drained but not handled, or not done: left uncommitted, so delivered again.
            unfinished: list[asyncio.Task[Any]] = [h.task for h in in_flight]
            if upcoming is not None:
                unfinished.append(upcoming)
            if self._commit_later is not None:
                unfinished.append(self._commit_later)
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
            try:
                await self._commit_now()  # what finished, before leaving the group
            except Exception as exc:  # delivered again: handled idempotently
                log.warning("%s: offsets not committed at stop (%r)", self.handler.name, exc)
            for consumer in self.consumers:
                await consumer.stop()

    def _interactive_slots(self) -> int:
        """Batches that may run at once when the next one carries interactive work."""
        return self.max_in_flight + 1 if self.spare and self._backfilling else self.max_in_flight

    def _room(self, in_flight: InFlight, running: int, records: Sequence[Record]) -> bool:
        """Whether ``records`` may start as a batch: a slot is free (or the spare one,
        if they carry interactive work), and not too many finished batches wait behind
        an unfinished one to be committed."""
        slots = self.max_in_flight
        if self._interactive_slots() > slots and self._background_count(records) < len(records):
            slots += 1
        return running < slots and len(in_flight) < MAX_UNCOMMITTED_BATCHES

    def _start(self, records: list[Record]) -> Handling:
        """Hand ``records`` to the handler; the pacer hears when the batch ends."""
        task = asyncio.create_task(retry_until_done(self.handler, records, self.stopping))
        started = time.monotonic()
        background = self._background_count(records)
        if background == len(records):
            self._backfilling += 1
            task.add_done_callback(self._backfill_ended)
        pacer = self.pacer
        if pacer is not None and background < len(records):
            pacer.interactive_began()
            task.add_done_callback(lambda _: pacer.interactive_ended())
        if pacer is not None and background:

            def ran(done: asyncio.Task[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    # The background records' part of the batch's time.
                    took = time.monotonic() - started
                    pacer.ran_background(took * background / len(records))

            task.add_done_callback(ran)
        return Handling(records, task)

    def _backfill_ended(self, _: asyncio.Task[bool]) -> None:
        self._backfilling -= 1

    async def _commit_done(self, in_flight: InFlight) -> bool:
        """Commit past the finished batches at the head of ``in_flight``, oldest first;
        False if one of them gave up (the consumer is stopping)."""
        while in_flight and in_flight[0].task.done():
            done = in_flight.popleft()
            if not done.task.result():
                return False
            await self._commit(done.records)
        return True

    def _background_count(self, records: Sequence[Record]) -> int:
        if self.background is None:
            return 0
        topics = self.background.subscription()
        return sum(1 for record in records if record.topic in topics)

    async def _commit(self, records: Sequence[Record]) -> None:
        """Commit exactly past ``records`` (the consumers may have read further ahead):
        now, or within COMMIT_INTERVAL_S of the last commit."""
        ends = self._uncommitted
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            ends[tp] = max(ends.get(tp, 0), record.offset + 1)
        wait = self._committed_at + COMMIT_INTERVAL_S - time.monotonic()
        if wait <= 0:
            await self._commit_now()
        elif self._commit_later is None or self._commit_later.done():
            self._commit_later = asyncio.create_task(self._commit_after(wait))

    async def _commit_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._commit_now()
        except KafkaError as exc:  # the next batch's commit carries them
            log.warning("%s: offsets not committed yet (%r)", self.handler.name, exc)

    async def _commit_now(self) -> None:
        """Commit the offsets past every finished batch, one commit per consumer."""
        async with self._committing:
            ends, self._uncommitted = self._uncommitted, {}
            self._committed_at = time.monotonic()
            try:
                for consumer in self.consumers:
                    assigned = consumer.assignment()
                    mine = {tp: offset for tp, offset in ends.items() if tp in assigned}
                    if mine:
                        await consumer.commit(mine)
                    for tp, end in mine.items():
                        observe_lag(
                            self.handler.name, tp.topic, tp.partition, consumer.highwater(tp), end
                        )
            except BaseException:
                for tp, end in ends.items():  # tried again by the next commit
                    self._uncommitted[tp] = max(self._uncommitted.get(tp, 0), end)
                raise

    def ready(self) -> bool:
        """Every lane has its partitions."""
        return all(consumer.assignment() for consumer in self.consumers)

    def stop(self) -> None:
        self.stopping.set()
