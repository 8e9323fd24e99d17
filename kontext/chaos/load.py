"""Steady load and its tally: jobs submitted over HTTP, replies counted per job id."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.events import JobReply

Body = Callable[[int], dict[str, Any]]


class LoadGenerator:
    """Submits ``rate`` jobs a second for ``duration`` seconds; remembers the accepted ones.

    Submissions are paced on a clock, not on answers, so a stalled API does not slow
    the offered load; a refused or timed-out submission is counted, not retried.
    """

    def __init__(
        self, api_url: str, rate: float, duration: float, body: Body, api_key: str | None = None
    ) -> None:
        self.api_url = api_url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rate = rate
        self.duration = duration
        self.body = body
        self.accepted: dict[UUID, float] = {}
        """Job id -> when the API accepted it (unix time)."""
        self.refused: Counter[str] = Counter()

    async def run(self) -> None:
        async with aiohttp.ClientSession(
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=10.0),
            connector=aiohttp.TCPConnector(limit=1000),
        ) as http:
            start = time.monotonic()
            tasks = []
            for n in range(int(self.rate * self.duration)):
                delay = start + n / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._submit(http, n)))
            await asyncio.gather(*tasks)

    async def _submit(self, http: aiohttp.ClientSession, n: int) -> None:
        try:
            async with http.post(f"{self.api_url}/v1/jobs", json=self.body(n)) as response:
                status = response.status
                body = await response.json() if status == 202 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.refused[type(exc).__name__] += 1
            return
        if status == 202 and body is not None:
            self.accepted[UUID(body["id"])] = time.time()
        else:
            self.refused[str(status)] += 1


class ReplyTally:
    """Reads the reply topic from its start and counts distinct reply records per job.

    A broker restart (in-memory storage) empties the topic: ``outage()`` holds the
    reader while the broker is away, then reads the new log from its start. Records
    are told apart by (broker epoch, partition, offset), so re-reading one never
    counts it twice.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.replies: Counter[UUID] = Counter()
        self.first_reply: dict[UUID, float] = {}
        self.outages: list[tuple[float, float]] = []
        """(start, end) unix times of each broker restart."""
        self.lock = asyncio.Lock()
        self.epoch = 0
        self._seen: set[tuple[int, int, int]] = set()
        self._partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        partitions = self.consumer.partitions_for_topic(self.topic) or set()
        self._partitions = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.consumer.assign(self._partitions)
        await self.consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            async with self.lock:
                batches = await self.consumer.getmany(timeout_ms=200)
            now = time.time()
            for tp, messages in batches.items():
                for message in messages:
                    where = (self.epoch, tp.partition, message.offset)
                    if where in self._seen:
                        continue
                    self._seen.add(where)
                    try:
                        reply = JobReply.decode(message.value)
                    except ValueError:
                        continue  # poison on the reply topic is the consumers' business
                    self.replies[reply.job_id] += 1
                    self.first_reply.setdefault(reply.job_id, now)

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """Hold the reader while the broker restarts; then read the new log from its start."""
        async with self.lock:
            start = time.time()
            yield
            self.outages.append((start, time.time()))
            self.epoch += 1
            await self.consumer.seek_to_beginning(*self._partitions)


@dataclass(frozen=True)
class Final:
    """A finished job as the ledger has it (unix times)."""

    status: str
    completed_at: float
    replied_at: float | None


async def final_jobs(pool: asyncpg.Pool, ids: list[UUID]) -> dict[UUID, Final]:
    """Each of these jobs that is final (succeeded or failed)."""
    rows = await pool.fetch(
        "SELECT id, status, completed_at, replied_at FROM jobs WHERE id = ANY($1::uuid[]) "
        "AND status IN ('succeeded', 'failed')",
        ids,
    )
    return {
        row["id"]: Final(
            row["status"],
            row["completed_at"].timestamp(),
            row["replied_at"].timestamp() if row["replied_at"] else None,
        )
        for row in rows
    }


async def in_flight(pool: asyncpg.Pool, ids: list[UUID]) -> int:
    """Jobs admitted by the enricher and not yet final (in the inference pipe)."""
    count: int = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'running'", ids
    )
    return count
