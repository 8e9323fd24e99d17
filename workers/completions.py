"""Completions: built from an engine's answer (or failure) by the inference worker and
the policy steps that answer without the engine (the response cache), and published
to the completions topic, keyed by conversation, from one place."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer

from kontext.settings import Settings
from schemas.events import EnrichedRequest, ErrorInfo, JobCompletion, TurnRecord, Usage
from workers.engines.base import Generation


async def publish(
    settings: Settings, producer: AIOKafkaProducer, completions: Sequence[JobCompletion]
) -> list[asyncio.Future[object]]:
    """Queue the completions for the recorder; await the futures for delivery."""
    topic = settings.topics.completions
    return [
        await producer.send(topic, done.encode(), key=done.conversation_id.encode())
        for done in completions
    ]


def completion_for(item: EnrichedRequest, output: Generation | ErrorInfo) -> JobCompletion:
    """The completion to publish for ``item``: succeeded with the answer, or failed."""
    if isinstance(output, ErrorInfo):
        return JobCompletion.failure(item.request, output, item.context)
    request = item.request
    usage = Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        total_tokens=output.prompt_tokens + output.completion_tokens,
    )
    # A model may emit a NUL byte; Postgres text cannot hold one, and the job must be
    # recordable (a completion the recorder cannot store would stall its partition).
    text = output.text.replace("\x00", "")
    answer = TurnRecord(role="assistant", content=text, tokens=output.completion_tokens)
    return JobCompletion(
        job_id=request.job_id,
        conversation_id=request.conversation_id,
        tenant_id=request.tenant_id,
        model=request.model,
        context=item.context,
        status="succeeded",
        submitted_at=request.submitted_at,
        output=text,
        finish_reason=output.finish_reason,
        usage=usage,
        new_turns=[*item.new_turns, answer],
        mean_logprob=output.mean_logprob,
    )
