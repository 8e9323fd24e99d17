"""Dead-lettering: messages a consumer cannot handle go to one topic with the reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from kontext.metrics import DEAD_LETTERS, reason_code
from schemas.events import DeadLetter
from workers.records import Record

log = logging.getLogger(__name__)

T = TypeVar("T")


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

    async def decode(
        self,
        records: Sequence[Record],
        decode: Callable[[bytes | None], T],
        what: str,
        sends: list[asyncio.Future[object]],
    ) -> list[tuple[Record, T]]:
        """Each record with its decoded event; one that does not decode is dead-lettered
        as an invalid ``what`` (its send queued on ``sends``) and left out."""
        decoded: list[tuple[Record, T]] = []
        for record in records:
            try:
                decoded.append((record, decode(record.value)))
            except (ValidationError, ValueError) as exc:
                sends.append(await self.send(record, f"invalid {what}: {exc}"))
        return decoded
