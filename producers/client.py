"""Async Python client: submit jobs over HTTP, await results from the reply topic.

async with KontextClient("http://127.0.0.1:8000", "127.0.0.1:9092", api_key="kx_...") as client:
    job = await client.submit(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
    reply = await client.result(job.id, timeout=60)
    print(reply.result.choices[0].message.content)

The API key defaults to the ``KONTEXT_API_KEY`` environment variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.api import JobAccepted, JobView
from schemas.events import JobReply
from schemas.topics import JOB_ID_HEADER, Topics

RECENT_REPLIES = 10_000
POOL_CONNECTIONS = 16


class KontextError(Exception):
    """The API refused a request; ``code`` and ``message`` come from its error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class KontextClient:
    """Submits over HTTP; reads replies from Kafka, filtered by job id."""

    def __init__(
        self,
        api_url: str,
        bootstrap_servers: str,
        *,
        topics: Topics | None = None,
        http_timeout: float = 30.0,
        api_key: str | None = None,
        http_pools: int = 16,
        fetch_max_wait_ms: int = 5,
    ) -> None:
        """Requests go round-robin over ``http_pools`` connection pools of
        ``POOL_CONNECTIONS`` kept-alive connections each (httpx scans every connection of
        a pool for each request: one pool of hundreds costs milliseconds per request).
        ``fetch_max_wait_ms``: how long a fetch of the reply topic may wait for data (some
        brokers answer a waiting fetch only then: the delay of every reply)."""
        key = api_key or os.environ.get("KONTEXT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else None
        limits = httpx.Limits(
            max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS
        )
        self._pools = [
            httpx.AsyncClient(
                base_url=api_url, timeout=http_timeout, headers=headers, limits=limits
            )
            for _ in range(max(1, http_pools))
        ]
        self._turn = itertools.cycle(self._pools)
        self._topic = (topics or Topics()).replies
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )
        self._waiters: dict[UUID, asyncio.Future[JobReply]] = {}
        self._recent: OrderedDict[UUID, bytes] = OrderedDict()
        """Replies read before anyone waited for them (raw, decoded when claimed)."""
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> KontextClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Begin reading the reply topic from its end, before any job is submitted."""
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self._topic)
        if not partitions:
            await self._consumer.stop()
            raise RuntimeError(f"reply topic {self._topic} does not exist")
        assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        self._consumer.assign(assigned)
        await self._consumer.seek_to_end(*assigned)
        for tp in assigned:
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._consumer.stop()
        for pool in self._pools:
            await pool.aclose()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    if message.value is not None:
                        self._deliver(message.value, _job_id(message.headers, message.value))

    def _deliver(self, raw: bytes, job_id: UUID | None) -> None:
        if job_id is None:
            return
        waiter = self._waiters.pop(job_id, None)
        if waiter is None:
            self._recent[job_id] = raw
            while len(self._recent) > RECENT_REPLIES:
                self._recent.popitem(last=False)
            return
        if not waiter.done():
            try:
                waiter.set_result(JobReply.decode(raw))
            except ValueError as exc:
                waiter.set_exception(exc)

    def _http(self) -> httpx.AsyncClient:
        return next(self._turn)

    async def submit(self, **body: Any) -> JobAccepted:
        """POST /v1/jobs with OpenAI-style fields (model, messages, conversation_id, ...)."""
        response = await self._http().post("/v1/jobs", json=body)
        _raise_for_error(response)
        return JobAccepted.model_validate(response.json())

    async def get(self, job_id: UUID) -> JobView:
        response = await self._http().get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobView.model_validate(response.json())

    async def result(self, job_id: UUID, timeout: float = 60.0) -> JobReply:
        """The job's reply (succeeded or failed); TimeoutError if none comes in time.
        A job submitted before this client started is looked up in the ledger first."""
        return await self._await(job_id, timeout, ask_first=True)

    async def _await(self, job_id: UUID, timeout: float, ask_first: bool) -> JobReply:
        if job_id in self._recent:
            return JobReply.decode(self._recent.pop(job_id))
        waiter = self._waiters.setdefault(job_id, asyncio.get_running_loop().create_future())
        try:
            if ask_first and (final := await self._final(job_id)) is not None:
                return final
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                # Its reply may have gone by unseen (a broker that lost it): ask once.
                if (final := await self._final(job_id)) is not None:
                    return final
                raise
        finally:
            self._waiters.pop(job_id, None)

    async def _final(self, job_id: UUID) -> JobReply | None:
        """The job's reply as the ledger has it, if it is final."""
        view = await self.get(job_id)
        if view.status not in ("succeeded", "failed"):
            return None
        return JobReply(
            job_id=view.id,
            conversation_id=view.conversation_id,
            status=view.status,
            result=view.result,
            error=view.error,
        )

    async def chat(self, timeout: float = 60.0, **body: Any) -> JobReply:
        """Submit and wait: the one-call form. This client reads the reply topic since
        before the job existed, so it waits for the reply without asking the API."""
        job = await self.submit(**body)
        return await self._await(job.id, timeout, ask_first=False)


def _job_id(headers: Sequence[tuple[str, bytes]], raw: bytes) -> UUID | None:
    """A reply's job id: from its header, else (a reply without one) from its body."""
    for name, value in headers:
        if name == JOB_ID_HEADER:
            try:
                return UUID(value.decode())
            except (UnicodeDecodeError, ValueError):
                return None
    try:
        return JobReply.decode(raw).job_id
    except ValueError:
        return None


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise KontextError(response.status_code, code, message)
