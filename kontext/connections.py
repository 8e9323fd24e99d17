"""Connections to Postgres and Kafka, configured one way for every service."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from pgvector.asyncpg import register_vector

from kontext.settings import Settings
from kontext.stackfile import named, without_password

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""How long the first connection to Postgres may take before it counts as unreachable."""


class Unreachable(Exception):
    """Postgres or Kafka cannot be reached where the settings point, or refused the
    login: the message says which, where (password hidden) and why, in one line."""


POSTGRES_REFUSALS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
"""What a first connection raises when Postgres is not there, or refuses the role,
password or database."""


def _postgres_unreachable(settings: Settings, exc: BaseException) -> Unreachable:
    where = without_password(settings.dsn)
    source = named("DATABASE_URL", settings.database_url, settings)
    return Unreachable(f"cannot connect to Postgres at {where}{source}: {exc}")


async def connect(settings: Settings) -> asyncpg.Connection:
    """One plain connection (for a command's few statements); Unreachable if Postgres
    is not there, or refuses the role, password or database."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(settings.dsn, timeout=CONNECT_TIMEOUT_S)
    except POSTGRES_REFUSALS as exc:
        raise _postgres_unreachable(settings, exc) from exc
    return conn


async def reach_postgres(settings: Settings) -> None:
    """Connect once and close: Unreachable, as ``connect``, if that fails."""
    await (await connect(settings)).close()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
    )
    await register_vector(conn)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: asyncpg has rolled back a transaction left open, and no
    service sets session state (LISTEN runs on connections of its own), so its default
    reset, four more statements per release, would be a round trip for nothing."""


async def create_pool(settings: Settings, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """An asyncpg pool with jsonb as Python objects and pgvector's vector type;
    Unreachable if its first connections cannot be made."""
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            settings.dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            timeout=CONNECT_TIMEOUT_S,
        )
    except POSTGRES_REFUSALS as exc:
        raise _postgres_unreachable(settings, exc) from exc
    return pool


def create_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """Producer for at-least-once delivery (acks from all replicas; no idempotence:
    the embedded broker cannot do it, and every consumer dedupes by job id)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "acks": "all",
        "linger_ms": settings.kafka_linger_ms,
        "max_request_size": 4 * 1024 * 1024,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def create_consumer(
    settings: Settings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """Consumer in a group that commits by hand, after its output is published (or,
    with no ``group_id``, one that reads the partitions it is assigned)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
        "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
        "fetch_max_bytes": settings.kafka_fetch_max_bytes,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def ensure_topics(settings: Settings, topics: list[str]) -> None:
    """Create the topics that do not exist yet (never rely on auto-creation); the
    first contact with the broker: Unreachable if there is none."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        await admin.start()
    except KafkaConnectionError as exc:
        await admin.close()
        where = settings.bootstrap
        source = named("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers, settings)
        raise Unreachable(f"cannot connect to Kafka at {where}{source}: {exc}") from exc
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if not missing:
            return
        new = [
            NewTopic(
                name=t,
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
            )
            for t in missing
        ]
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:
            log.debug("topics created concurrently: %s", missing)
    finally:
        await admin.close()


QUIET_SHARE = 0.1
"""A fetch waits at most this share of the time its consumer has had no records."""
FLOW_WINDOW_S = 0.1
"""How often a consumer's record rate is measured."""


@dataclass
class _Flow:
    """One consumer's records: when the last came, and the rate of the last window."""

    last_data: float
    window_start: float
    window_records: int = 0
    flowing: bool = False
    """Its last window brought at least ``busy_rate`` records a second."""


class FetchTempo:
    """Fetch waits that follow the traffic. A broker that answers a waiting fetch only
    when its wait runs out (the embedded one does) makes the wait each hop's latency,
    and every fetch that comes back empty costs the consumer and the broker about as
    much as tens of records. So a consumer's fetches wait:

    - the short wait while records trickle in (a few ms per hop);
    - the busy wait while they flow at ``busy_rate`` records a second or more: records
      then come in bursts (each stage publishes a batch at once), a short wait polls
      the broker several times empty between two of them, and a few ms more per hop
      is small beside the queueing of such a load;
    - once they stop, a tenth of the time since the last record, up to the long
      wait: the first job after a pause waits at most a tenth of it, and a quiet
      stack polls a few times a second, not hundreds.

    A broker that answers as soon as data arrives (Kafka) is unaffected either way."""

    def __init__(
        self,
        short_ms: int,
        long_ms: int,
        busy_ms: int | None = None,
        busy_rate: float = 200.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.short_ms = short_ms
        self.long_ms = max(long_ms, short_ms)
        self.busy_ms = short_ms if busy_ms is None else max(busy_ms, short_ms)
        self.busy_rate = busy_rate
        self._clock = clock
        self._flows: dict[int, _Flow] = {}

    def observe(self, consumer: AIOKafkaConsumer, records: int) -> None:
        """After a fetch of ``consumer`` that brought ``records``: set the wait of its
        next fetches."""
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is None:  # not started
            return
        now = self._clock()
        flow = self._flows.get(id(consumer))
        if flow is None:
            flow = self._flows[id(consumer)] = _Flow(now, now)
        if records:
            flow.last_data = now
            flow.window_records += records
        elapsed = now - flow.window_start
        if elapsed >= FLOW_WINDOW_S:
            flow.flowing = flow.window_records >= self.busy_rate * elapsed
            flow.window_start, flow.window_records = now, 0
        if flow.flowing:
            wait = self.busy_ms
        else:
            quiet_ms = (now - flow.last_data) * 1000
            wait = min(max(int(quiet_ms * QUIET_SHARE), self.short_ms), self.long_ms)
        fetcher._fetch_max_wait_ms = wait

    @classmethod
    def of(cls, settings: Settings) -> FetchTempo:
        return cls(
            settings.kafka_fetch_max_wait_ms,
            settings.kafka_idle_fetch_max_wait_ms,
            settings.kafka_busy_fetch_max_wait_ms,
            settings.kafka_busy_fetch_rate,
        )
