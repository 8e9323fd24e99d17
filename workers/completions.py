"""Completions: built from an engine's answer (or failure) by the inference worker and
the policy steps that answer without the engine (the response cache), and published
to the completions topic, keyed by conversation, from one place."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from uuid import UUID

from aiokafka import AIOKafkaProducer

from kontext import tracing
from kontext.settings import Settings
from schemas.events import (
    EnrichedRequest,
    ErrorInfo,
    JobCompletion,
    TokenLogprob,
    TurnRecord,
    Usage,
)
from workers.engines.base import Generation, ScoredToken


async def publish(
    settings: Settings,
    producer: AIOKafkaProducer,
    completions: Sequence[JobCompletion],
    headers: Mapping[UUID, tracing.Headers] | None = None,
) -> list[asyncio.Future[object]]:
    """Queue the completions for the recorder, each with its job's trace context from
    ``headers`` (when traced); await the futures for delivery."""
    topic = settings.topics.completions
    if not headers:
        return [
            await producer.send(topic, done.encode(), key=done.conversation_id.encode())
            for done in completions
        ]
    return [
        await producer.send(
            topic,
            done.encode(),
            key=done.conversation_id.encode(),
            headers=headers.get(done.job_id) or None,
        )
        for done in completions
    ]


def completion_for(
    item: EnrichedRequest,
    output: Generation | ErrorInfo,
    batched_at: datetime | None = None,
    generated_at: datetime | None = None,
) -> JobCompletion:
    """The completion to publish for ``item``: succeeded with the answer, or failed;
    stamped with when it was enriched and when its batch's engine call began and ended
    (the job's timeline)."""
    if isinstance(output, ErrorInfo):
        failed = JobCompletion.failure(item.request, output, item.context)
        failed.enriched_at = item.enriched_at
        failed.batched_at = batched_at
        failed.generated_at = generated_at
        return failed
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
        logprobs=None if output.tokens is None else [_scored(t) for t in output.tokens],
        enriched_at=item.enriched_at,
        batched_at=batched_at,
        generated_at=generated_at,
    )


UNLIKELY = -9999.0
"""The log-probability given for a token of (almost) no probability, as OpenAI does:
JSON has no -Infinity."""


def _scored(token: ScoredToken) -> TokenLogprob:
    text = token.bytes.decode(errors="replace").replace("\x00", "")  # Postgres holds no NUL
    logprob = token.logprob if token.logprob > UNLIKELY else UNLIKELY  # NaN too
    return TokenLogprob(token=text, logprob=logprob, bytes=list(token.bytes))
