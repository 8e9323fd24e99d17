"""The enricher: admits requests into the pipeline with their conversation's context.

One Postgres round trip per micro-batch claims the jobs and reads their
history; each request leaves with its prompt rendered by the model's chat
template, on its model's inference topic (keyed by conversation id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from kontext import ledger
from kontext.settings import Settings
from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, JobRequest
from workers.context import PromptTooLong, assemble
from workers.deadletter import DeadLetters
from workers.engines.base import ChatTokenizer
from workers.records import Record

log = logging.getLogger(__name__)


class Enricher:
    name = "enricher"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        tokenizers: Mapping[str, tuple[ChatTokenizer, int]],
    ) -> None:
        """``tokenizers`` maps each served model to its tokenizer and context window."""
        self.settings = settings
        self.pool = pool
        self.producer = producer
        self.tokenizers = tokenizers
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        requests: dict[UUID, JobRequest] = {}
        for record in records:
            try:
                request = JobRequest.decode(record.value)
            except (ValidationError, ValueError) as exc:
                sends.append(await self.dead_letters.send(record, f"invalid JobRequest: {exc}"))
                continue
            requests.setdefault(request.job_id, request)
        if requests:
            async with self.pool.acquire() as conn:
                history = await ledger.claim_with_history(
                    conn, list(requests), self.settings.context_turns
                )
            for job_id, request in requests.items():
                if job_id not in history:
                    log.info("job %s is already final or unknown; skipped", job_id)
                    continue
                sends.append(await self._forward(request, history[job_id]))
        if sends:
            await asyncio.gather(*sends)

    async def _forward(
        self, request: JobRequest, history: Sequence[ledger.StoredTurn]
    ) -> asyncio.Future[object]:
        topics = self.settings.topics
        key = request.conversation_id.encode()
        served = self.tokenizers.get(request.model)
        try:
            if served is None:
                raise LookupError(f"model {request.model!r} is not served by this deployment")
            tokenizer, window = served
            assembled = assemble(request, history, tokenizer, window, self.settings.system_prompt)
        except (LookupError, PromptTooLong) as exc:
            code = "unknown_model" if isinstance(exc, LookupError) else "prompt_too_long"
            failed = JobCompletion(
                job_id=request.job_id,
                conversation_id=request.conversation_id,
                model=request.model,
                status="failed",
                error=ErrorInfo(code=code, message=str(exc).strip("'\"")),
            )
            future: asyncio.Future[object] = await self.producer.send(
                topics.completions, failed.encode(), key=key
            )
            return future
        enriched = EnrichedRequest(
            request=request,
            prompt=assembled.prompt,
            context=assembled.context,
            new_turns=assembled.new_turns,
        )
        future = await self.producer.send(
            topics.inference(request.model), enriched.encode(), key=key
        )
        return future
