"""Raw Kafka records as every worker sees them, and the handler contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message, before parsing (so a bad one can be dead-lettered whole)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()


class BatchHandler(Protocol):
    """Handles a micro-batch. Returns only once every output is published, so the
    caller may commit the batch's offsets; raises if the batch should be retried."""

    name: str

    async def handle(self, records: Sequence[Record]) -> None: ...


@runtime_checkable
class Flushing(Protocol):
    """A handler that keeps work for its next batch: the consume loop flushes it when it
    stops."""

    async def flush(self) -> None: ...
