"""The recorder: writes each result to the ledger and the conversation, then replies.

Replies go out only after the turn is stored, so a client that reads its reply
and sends the next turn always finds the previous one in memory. Recording a
turn also lets the conversation's next waiting turn through: its request is
published again for the enricher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from kontext import ledger
from kontext.settings import Settings
from schemas.events import ChatCompletion, ErrorInfo, JobCompletion, JobReply
from workers.deadletter import DeadLetters
from workers.records import Record

log = logging.getLogger(__name__)


class Recorder:
    name = "recorder"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        completions: list[JobCompletion] = []
        for record in records:
            try:
                completions.append(JobCompletion.decode(record.value))
            except (ValidationError, ValueError) as exc:
                sends.append(await self.dead_letters.send(record, f"invalid JobCompletion: {exc}"))
        if completions:
            async with self.pool.acquire() as conn:
                recorded = await ledger.record(conn, completions)
            outcomes = recorded.outcomes
            known = {o.job_id for o in outcomes}
            for done in completions:
                if done.job_id not in known:
                    log.warning("completion for unknown job %s dropped", done.job_id)
            for outcome in outcomes:
                reply = JobReply(
                    job_id=outcome.job_id,
                    conversation_id=outcome.conversation_id,
                    status="succeeded" if outcome.status == "succeeded" else "failed",
                    result=ChatCompletion.model_validate(outcome.result)
                    if outcome.result
                    else None,
                    error=ErrorInfo.model_validate(outcome.error) if outcome.error else None,
                )
                sends.append(
                    await self.producer.send(
                        self.settings.topics.replies,
                        reply.encode(),
                        key=outcome.conversation_id.encode(),
                    )
                )
            for request in recorded.redrive:
                # The next turn of a conversation, held back until this one was recorded.
                sends.append(
                    await self.producer.send(
                        self.settings.topics.requests,
                        orjson.dumps(request),
                        key=str(request["conversation_id"]).encode(),
                    )
                )
        if sends:
            await asyncio.gather(*sends)
