"""What the dashboard reads from Kafka: consumer lag per group, topic and partition,
group membership, and the recent dead letters (with redelivery).

Lag is the broker's own numbers: each group's committed offset against the
partition's high watermark, so it is right for consumers in any process. Dead
letters live only on their topic; a tail reader keeps the most recent ones in
memory, and redelivering one publishes its original bytes to its source topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import BaseModel, ValidationError

from kontext.settings import Settings
from producers import submissions
from schemas.events import DeadLetter
from schemas.limits import WorkerHeartbeat
from workers import catalog

log = logging.getLogger(__name__)

CACHE_S = 1.0
"""Lag is read at most this often, however many dashboards poll."""
HEARTBEATS_BACK = 200
"""Heartbeat records read back per partition at start (a few seconds of every worker's)."""
FORGET_WORKER_S = 300.0
"""A worker silent this long is no longer listed."""


class PartitionLag(BaseModel):
    topic: str
    partition: int
    committed: int | None
    highwater: int
    lag: int


class GroupView(BaseModel):
    group: str
    service: str
    model: str | None
    state: str
    members: int | None
    """None where the broker could not say."""
    lag: int
    partitions: list[PartitionLag]


class Letter(BaseModel):
    """A dead letter as the dashboard lists it (``value`` is not shown, only its size)."""

    partition: int
    offset: int
    source_topic: str
    source_partition: int
    source_offset: int
    consumer: str
    reason: str
    failed_at: datetime | None
    size: int
    redeliverable: bool
    redelivered: bool = False


class WorkerView(BaseModel):
    """An inference worker, from its latest heartbeat."""

    worker_id: str
    model: str
    seen_s_ago: float
    lag: int | None
    alive: bool


class KafkaView:
    """One admin client and one group-less consumer (tailing the dead-letter and
    heartbeat topics)."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer, keep: int = 100) -> None:
        self.settings = settings
        self.producer = producer
        self.topic = settings.topics.dead_letters
        self.admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, enable_auto_commit=False
        )
        self.keep = keep
        self._letters: deque[tuple[Letter, DeadLetter | None]] = deque(maxlen=keep)
        self._redelivered: set[tuple[int, int]] = set()
        self._partitions: dict[str, list[int]] = {}
        self._tail: asyncio.Task[None] | None = None
        self._lag: tuple[float, list[GroupView]] | None = None
        self._lag_lock = asyncio.Lock()
        self._undescribable: set[str] = set()
        self._beats: dict[tuple[str, str], WorkerHeartbeat] = {}

    async def start(self) -> None:
        await self.admin.start()
        await self.consumer.start()
        letters = [TopicPartition(self.topic, p) for p in await self._partitions_of(self.topic)]
        beats = self.settings.topics.heartbeats
        heartbeats = [TopicPartition(beats, p) for p in await self._partitions_of(beats)]
        self.consumer.assign(letters + heartbeats)
        if letters or heartbeats:
            begin = await self.consumer.beginning_offsets(letters + heartbeats)
            end = await self.consumer.end_offsets(letters + heartbeats)
            for tp in letters:
                self.consumer.seek(tp, max(begin[tp], end[tp] - self.keep))
            for tp in heartbeats:  # enough for the latest beat of every worker
                self.consumer.seek(tp, max(begin[tp], end[tp] - HEARTBEATS_BACK))
        self._tail = asyncio.create_task(self._follow(), name="dashboard-dead-letters")

    async def close(self) -> None:
        """Stop the tail reader and both clients (also after a failed start)."""
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tail
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        with contextlib.suppress(Exception):
            await self.admin.close()

    async def _partitions_of(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            described = await self.admin.describe_topics([topic])
            self._partitions[topic] = sorted(
                p["partition"] for d in described if d["topic"] == topic for p in d["partitions"]
            )
        return self._partitions[topic]

    async def _follow(self) -> None:
        while True:
            try:
                fetched = await self.consumer.getmany(timeout_ms=1000, max_records=500)
            except Exception as exc:
                log.warning("dashboard: reading dead letters failed (%s); retrying", exc)
                await asyncio.sleep(1)
                continue
            records = [r for rs in fetched.values() for r in rs]
            for record in sorted(records, key=lambda r: r.timestamp):
                if record.topic == self.topic:
                    self._letters.append(_letter(record.partition, record.offset, record.value))
                    continue
                try:
                    beat = WorkerHeartbeat.decode(record.value)
                except (ValidationError, ValueError):
                    continue
                self._beats[(beat.worker_id, beat.model)] = beat

    def workers(self) -> list[WorkerView]:
        """Inference workers heard from in the last few minutes, by model."""
        now = time.time()
        timeout = self.settings.route_heartbeat_timeout_s
        for key, beat in list(self._beats.items()):
            if now - beat.at > FORGET_WORKER_S:
                del self._beats[key]
        return [
            WorkerView(
                worker_id=beat.worker_id,
                model=beat.model,
                seen_s_ago=round(max(now - beat.at, 0.0), 1),
                lag=beat.lag,
                alive=now - beat.at <= timeout,
            )
            for beat in sorted(self._beats.values(), key=lambda b: (b.model, b.worker_id))
        ]

    def letters(self) -> list[Letter]:
        """The most recent dead letters, newest first."""
        return [
            letter.model_copy(
                update={"redelivered": (letter.partition, letter.offset) in self._redelivered}
            )
            for letter, _ in reversed(self._letters)
        ]

    async def redeliver(self, partition: int, offset: int) -> Letter | None:
        """Publish the dead letter's original bytes (and key) to its source topic.

        None when it is not among the recent dead letters; raises ValueError when it
        carries no original bytes."""
        for letter, original in self._letters:
            if (letter.partition, letter.offset) != (partition, offset):
                continue
            if original is None or original.value is None:
                raise ValueError("this dead letter carries no original message to redeliver")
            await self.producer.send_and_wait(
                original.source_topic, original.value, key=original.key
            )
            self._redelivered.add((partition, offset))
            log.info(
                "redelivered dead letter %s[%d]@%d to %s",
                self.topic,
                partition,
                offset,
                original.source_topic,
            )
            return letter.model_copy(update={"redelivered": True})
        return None

    async def lag(self) -> list[GroupView]:
        """Every pipeline group's committed offsets against the high watermarks."""
        async with self._lag_lock:
            if self._lag is not None and time.monotonic() - self._lag[0] < CACHE_S:
                return self._lag[1]
            views = await self._read_lag()
            self._lag = (time.monotonic(), views)
            return views

    async def _read_lag(self) -> list[GroupView]:
        known = [*submissions.groups(self.settings), *catalog.groups(self.settings)]
        topics = sorted({t for g in known for t in g.topics})
        partitions = {
            t: [TopicPartition(t, p) for p in await self._partitions_of(t)] for t in topics
        }
        everything = [tp for tps in partitions.values() for tp in tps]
        highwater = await self.consumer.end_offsets(everything)
        committed = await asyncio.gather(
            *(
                self.admin.list_consumer_group_offsets(
                    g.id, partitions=[tp for t in g.topics for tp in partitions[t]]
                )
                for g in known
            )
        )
        states = await self._states([g.id for g in known])
        views: list[GroupView] = []
        for group, offsets in zip(known, committed, strict=True):
            rows: list[PartitionLag] = []
            for topic in group.topics:
                for tp in partitions[topic]:
                    found = offsets.get(tp)
                    at = found.offset if found is not None and found.offset >= 0 else None
                    # A broker may report a stale high watermark (the embedded one gives
                    # the last record batch's base offset + 1); a commit proves more.
                    end = max(highwater.get(tp, 0), at or 0)
                    rows.append(
                        PartitionLag(
                            topic=topic,
                            partition=tp.partition,
                            committed=at,
                            highwater=end,
                            lag=max(end - (at or 0), 0),
                        )
                    )
            state, members = states.get(group.id, ("unknown", None))
            views.append(
                GroupView(
                    group=group.id,
                    service=group.service,
                    model=group.model,
                    state=state,
                    members=members,
                    lag=sum(r.lag for r in rows),
                    partitions=rows,
                )
            )
        return views

    async def _states(self, group_ids: list[str]) -> dict[str, tuple[str, int | None]]:
        """Each group's state and member count, one group at a time; a group whose
        DescribeGroups answer aiokafka cannot read (some Kafka-protocol brokers, e.g.
        the embedded one, answer some groups in a form it does not parse) is left out
        and not asked again."""
        states: dict[str, tuple[str, int | None]] = {}
        for group_id in group_ids:
            if group_id in self._undescribable:
                continue
            try:
                states.update(_group_states(await self.admin.describe_consumer_groups([group_id])))
            except Exception as exc:
                log.info("dashboard: cannot read group %s from the broker (%s)", group_id, exc)
                self._undescribable.add(group_id)
        return states


def _group_states(responses: list[Any]) -> dict[str, tuple[str, int | None]]:
    """Group id -> (state, member count) from DescribeGroups responses."""
    states: dict[str, tuple[str, int | None]] = {}
    for response in responses:
        for group in response.groups:
            error_code, group_id, state = group[0], group[1], group[2]
            members = group[5] if len(group) > 5 else []
            states[group_id] = (state if error_code == 0 and state else "unknown", len(members))
    return states


def _letter(partition: int, offset: int, raw: bytes | None) -> tuple[Letter, DeadLetter | None]:
    try:
        letter = DeadLetter.decode(raw or b"")
    except (ValidationError, ValueError):
        return (
            Letter(
                partition=partition,
                offset=offset,
                source_topic="?",
                source_partition=-1,
                source_offset=-1,
                consumer="?",
                reason="the dead letter itself does not parse",
                failed_at=None,
                size=len(raw or b""),
                redeliverable=False,
            ),
            None,
        )
    return (
        Letter(
            partition=partition,
            offset=offset,
            source_topic=letter.source_topic,
            source_partition=letter.partition,
            source_offset=letter.offset,
            consumer=letter.consumer,
            reason=letter.reason,
            failed_at=letter.failed_at,
            size=len(letter.value or b""),
            redeliverable=letter.value is not None,
        ),
        letter,
    )
