"""Dead-lettering: messages a consumer cannot handle go to one topic with the reason."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer

from kontext.metrics import DEAD_LETTERS, reason_code
from schemas.events import DeadLetter
from workers.records import Record

log = logging.getLogger(__name__)


class DeadLetters:
    """Publishes a record's original bytes and the reason, then lets the consumer go on."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, consumer: str) -> None:
        self._producer = producer
        self._topic = topic
        self._consumer = consumer

    async def send(self, record: Record, reason: str) -> asyncio.Future[object]:
        """Queue the dead letter; await the returned future for delivery."""
        DEAD_LETTERS.labels(record.topic, self._consumer, reason_code(reason)).inc()
        log.warning(
            "dead-lettering %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason
        )
        letter = DeadLetter(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            consumer=self._consumer,
            reason=reason[:2000],
            key=record.key,
            value=record.value,
        )
        future: asyncio.Future[object] = await self._producer.send(
            self._topic, letter.encode(), key=record.key
        )
        return future
