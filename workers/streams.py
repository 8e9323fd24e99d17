"""The faust seam: a stream processor that feeds micro-batches to a batch handler.

Everything faust-specific lives here. The agent reads raw bytes (so a bad
message can be dead-lettered whole), takes up to ``stage_batch_max_size`` events or
``batch_max_wait_ms`` (at least 1 ms), and acks them only after the handler has
published. It runs the enricher when ``KONTEXT_STREAM_RUNTIME=faust``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiokafka
import faust
from faust.exceptions import ConsumerNotStarted
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from kontext.metrics import observe_lag
from kontext.settings import Settings
from schemas.topics import Group
from workers.consumer import retry_until_done
from workers.records import BatchHandler, Record

log = logging.getLogger(__name__)


def _prompt_transport(settings: Settings) -> type[faust_aiokafka.Transport]:
    """faust's Kafka transport with our fetch limits: the wait instead of its fixed
    1.5 s (a broker may hold an empty fetch for the whole wait even once data
    arrives, the embedded one does, adding it to every hop's latency), and a bound
    on the bytes one fetch brings back (the embedded broker ignores the
    per-partition bound), so a backlog stays on the broker."""

    class Thread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(
            self, transport: faust_aiokafka.Transport
        ) -> aiokafka.AIOKafkaConsumer:
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = settings.kafka_fetch_max_wait_ms
            consumer._fetch_max_bytes = settings.kafka_fetch_max_bytes
            return consumer

    class PromptConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return Thread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        Consumer = PromptConsumer

    return Transport


class StreamProcessor:
    """A faust app running one handler over one topic, as a start/stop service."""

    def __init__(self, settings: Settings, group: Group, handler: BatchHandler) -> None:
        """``group`` names the app (its consumer group) and the one topic it reads."""
        self.handler = handler
        self.name = group.id.removeprefix(f"{settings.topic_prefix}-")
        self.stopping = asyncio.Event()
        [topic] = group.topics
        self.app = faust.App(
            group.id,
            broker=[f"kafka://{server}" for server in settings.bootstrap.split(",")],
            processing_guarantee="at_least_once",
            broker_session_timeout=settings.kafka_session_timeout_ms / 1000,
            broker_heartbeat_interval=settings.kafka_heartbeat_interval_ms / 1000,
            consumer_auto_offset_reset="earliest",
            topic_partitions=settings.topic_partitions,
            topic_replication_factor=settings.topic_replication,
            web_enabled=False,
            autodiscover=False,
            store="memory://",
            loop=asyncio.get_running_loop(),
        )
        transport = _prompt_transport(settings)
        self.app.transport = transport(self.app.conf.broker_consumer, self.app)
        source = self.app.topic(topic, key_serializer="raw", value_serializer="raw")
        max_size = settings.stage_batch_max_size
        # faust's take waits for a full batch or this long: never wait for ever (it
        # would stall), so at least a millisecond.
        within = max(settings.batch_max_wait_ms, 1) / 1000

        async def process(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
            batches = stream.take_events(max_size, within=within)  # type: ignore[attr-defined]
            async for events in batches:
                records = [
                    Record(
                        e.message.topic,
                        e.message.partition,
                        e.message.offset,
                        e.message.key,
                        e.message.value,
                    )
                    for e in events
                ]
                await retry_until_done(self.handler, records, self.stopping)
                self._observe_lag(records)
                yield None

        self.app.agent(source, name=self.name)(process)

    def _observe_lag(self, records: list[Record]) -> None:
        """Consumer lag of the partitions in this batch (the client's last known highwater)."""
        ends: dict[TP, int] = {}
        for r in records:
            tp = TP(r.topic, r.partition)
            ends[tp] = max(ends.get(tp, 0), r.offset + 1)
        for tp, end in ends.items():
            try:
                highwater = self.app.consumer.highwater(tp)
            except Exception:  # not started, or rebalancing: no figure this time
                continue
            observe_lag(self.handler.name, tp.topic, tp.partition, highwater, end)

    def assigned(self) -> bool:
        """True once the consumer group has given this processor partitions."""
        try:
            return bool(self.app.consumer.assignment())
        except ConsumerNotStarted:
            return False

    async def run(self) -> None:
        await self.app.start()
        await self.stopping.wait()

    async def stop(self) -> None:
        self.stopping.set()
        await self.app.stop()


class StreamService:
    """A faust stream processor as a service."""

    def __init__(self, processor: StreamProcessor) -> None:
        self.name = processor.name
        self.processor = processor

    async def run(self) -> None:
        await self.processor.run()

    def ready(self) -> bool:
        return self.processor.assigned()

    async def stop(self) -> None:
        await self.processor.stop()
