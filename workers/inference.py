"""The inference worker: drains micro-batches of enriched requests into one engine.

Each batch is one engine call. Results go to the completions topic; the batch's
offsets are committed (by the consume loop) only after they are delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from uuid import UUID

from aiokafka import AIOKafkaProducer
from prometheus_client import Histogram
from pydantic import ValidationError

from kontext.settings import Settings
from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, TurnRecord, Usage
from workers.deadletter import DeadLetters
from workers.engines.base import Engine, Generation, GenerationRequest
from workers.records import Record

log = logging.getLogger(__name__)

BATCH_SIZE = Histogram(
    "kontext_inference_batch_size",
    "Requests per engine call",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class InferenceWorker:
    def __init__(self, settings: Settings, engine: Engine, producer: AIOKafkaProducer) -> None:
        self.name = f"inference-{engine.name}"
        self.settings = settings
        self.engine = engine
        self.producer = producer
        self.dead_letters = DeadLetters(producer, settings.topics.dead_letters, self.name)

    async def handle(self, records: Sequence[Record]) -> None:
        sends: list[asyncio.Future[object]] = []
        batch: dict[UUID, EnrichedRequest] = {}
        for record in records:
            try:
                item = EnrichedRequest.decode(record.value)
            except (ValidationError, ValueError) as exc:
                sends.append(
                    await self.dead_letters.send(record, f"invalid EnrichedRequest: {exc}")
                )
                continue
            batch.setdefault(item.request.job_id, item)
        items = list(batch.values())
        if items:
            BATCH_SIZE.labels(self.engine.name).observe(len(items))
        outputs = await self._generate(items) if items else []
        for item, output in zip(items, outputs, strict=True):
            completion = self._completion(item, output)
            sends.append(
                await self.producer.send(
                    self.settings.topics.completions,
                    completion.encode(),
                    key=item.request.conversation_id.encode(),
                )
            )
        if sends:
            await asyncio.gather(*sends)

    async def _generate(self, items: Sequence[EnrichedRequest]) -> list[Generation | ErrorInfo]:
        """One engine call for the batch; if it fails, each item alone, so one bad
        prompt fails only its own job."""
        requests = [
            GenerationRequest(
                prompt=item.prompt,
                max_tokens=item.request.max_tokens,
                temperature=item.request.temperature,
            )
            for item in items
        ]
        try:
            return list(await self.engine.generate(requests))
        except Exception as exc:
            if len(requests) == 1:
                log.exception("%s: engine failed on job %s", self.name, items[0].request.job_id)
                return [ErrorInfo(code="engine_error", message=f"the engine failed: {exc}")]
        results: list[Generation | ErrorInfo] = []
        for item in items:
            results.extend(await self._generate([item]))
        return results

    def _completion(self, item: EnrichedRequest, output: Generation | ErrorInfo) -> JobCompletion:
        request = item.request
        completion = JobCompletion(
            job_id=request.job_id,
            conversation_id=request.conversation_id,
            tenant_id=request.tenant_id,
            model=request.model,
            context=item.context,
            status="failed",
        )
        if isinstance(output, ErrorInfo):
            return completion.model_copy(update={"error": output})
        usage = Usage(
            prompt_tokens=output.prompt_tokens,
            completion_tokens=output.completion_tokens,
            total_tokens=output.prompt_tokens + output.completion_tokens,
        )
        # A model may emit a NUL byte; Postgres text cannot hold one, and the job must be
        # recordable (a completion the recorder cannot store would stall its partition).
        text = output.text.replace("\x00", "")
        answer = TurnRecord(role="assistant", content=text, tokens=output.completion_tokens)
        return completion.model_copy(
            update={
                "status": "succeeded",
                "output": text,
                "finish_reason": output.finish_reason,
                "usage": usage,
                "new_turns": [*item.new_turns, answer],
            }
        )
