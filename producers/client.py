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
import os
from collections import OrderedDict
from types import TracebackType
from typing import Any
from uuid import UUID

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.api import JobAccepted, JobView
from schemas.events import JobReply
from schemas.topics import Topics

RECENT_REPLIES = 10_000


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
    ) -> None:
        key = api_key or os.environ.get("KONTEXT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = httpx.AsyncClient(base_url=api_url, timeout=http_timeout, headers=headers)
        self._topic = (topics or Topics()).replies
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None
        )
        self._waiters: dict[UUID, asyncio.Future[JobReply]] = {}
        self._recent: OrderedDict[UUID, JobReply] = OrderedDict()
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
        await self._http.aclose()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                for message in messages:
                    try:
                        reply = JobReply.decode(message.value)
                    except ValueError:
                        continue
                    self._deliver(reply)

    def _deliver(self, reply: JobReply) -> None:
        waiter = self._waiters.pop(reply.job_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)
            return
        self._recent[reply.job_id] = reply
        while len(self._recent) > RECENT_REPLIES:
            self._recent.popitem(last=False)

    async def submit(self, **body: Any) -> JobAccepted:
        """POST /v1/jobs with OpenAI-style fields (model, messages, conversation_id, ...)."""
        response = await self._http.post("/v1/jobs", json=body)
        _raise_for_error(response)
        return JobAccepted.model_validate(response.json())

    async def get(self, job_id: UUID) -> JobView:
        response = await self._http.get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return JobView.model_validate(response.json())

    async def result(self, job_id: UUID, timeout: float = 60.0) -> JobReply:
        """The job's reply (succeeded or failed); TimeoutError if none comes in time."""
        if job_id in self._recent:
            return self._recent.pop(job_id)
        waiter = self._waiters.setdefault(job_id, asyncio.get_running_loop().create_future())
        try:
            # A reply published before this client started is only in the ledger.
            view = await self.get(job_id)
            if view.status in ("succeeded", "failed") and not waiter.done():
                return JobReply(
                    job_id=view.id,
                    conversation_id=view.conversation_id,
                    status=view.status,
                    result=view.result,
                    error=view.error,
                )
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        finally:
            self._waiters.pop(job_id, None)

    async def chat(self, timeout: float = 60.0, **body: Any) -> JobReply:
        """Submit and wait: the one-call form."""
        job = await self.submit(**body)
        return await self.result(job.id, timeout)


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise KontextError(response.status_code, code, message)
