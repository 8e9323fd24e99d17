"""Admitting a job: validate against the deployment, record it in the ledger, publish it."""

from __future__ import annotations

import logging
import uuid

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from kontext import ledger
from kontext.settings import Settings
from kontext.ssrf import UrlGuard, UrlRefused
from schemas.api import JobSubmission
from schemas.events import ErrorInfo, JobRequest, WebhookTarget

log = logging.getLogger(__name__)


class SubmissionRejected(Exception):
    """A well-formed submission this deployment cannot take (nothing was stored)."""

    def __init__(self, code: str, message: str, *, served_models: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.served_models = served_models


class EnqueueFailed(Exception):
    """The job was recorded but could not be published; it is marked failed."""


def to_request(settings: Settings, submission: JobSubmission) -> JobRequest:
    """The event for a submission, or SubmissionRejected."""
    if submission.model not in settings.engines:
        raise SubmissionRejected(
            "unknown_model",
            f"model {submission.model!r} is not served here; served models: "
            + ", ".join(settings.engines),
            served_models=list(settings.engines),
        )
    max_tokens = submission.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise SubmissionRejected(
            "max_tokens_out_of_range",
            f"max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}",
        )
    return JobRequest(
        job_id=uuid.uuid4(),
        conversation_id=submission.conversation_id or uuid.uuid4().hex,
        model=submission.model,
        messages=submission.messages,
        max_tokens=max_tokens,
        temperature=submission.temperature,
        user=submission.user,
        recall_scope=submission.recall_scope,
        include_prompt=submission.include_prompt,
        metadata=submission.metadata,
        webhook=submission.webhook,
    )


async def check_webhook(settings: Settings, webhook: WebhookTarget | None) -> None:
    """Refuse a webhook this deployment cannot sign or must not call (SSRF guard)."""
    if webhook is None:
        return
    if webhook.secret is None and not settings.webhook_secret:
        raise SubmissionRejected(
            "webhook_secret_required",
            "this deployment has no webhook signing secret (KONTEXT_WEBHOOK_SECRET); "
            "give webhook.secret (whsec_...)",
        )
    try:
        await UrlGuard(settings.webhook_allow_hosts).check(webhook.url)
    except UrlRefused as exc:
        raise SubmissionRejected("webhook_url_refused", str(exc)) from None


def _without_secret(request: JobRequest) -> JobRequest:
    """The request as published: a webhook secret stays in the ledger, off the topics."""
    if request.webhook is None or request.webhook.secret is None:
        return request
    return request.model_copy(
        update={"webhook": request.webhook.model_copy(update={"secret": None})}
    )


async def enqueue(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    request: JobRequest,
    idempotency_key: str | None,
) -> tuple[ledger.JobRow, bool]:
    """Record a job in the ledger, then publish it. Returns the job and whether it is
    new (an idempotency key seen before returns the earlier job, not published again)."""
    job, created = await ledger.admit(pool, request, idempotency_key)
    if not created:
        return job, False
    try:
        await producer.send_and_wait(
            settings.topics.requests_lane(request.priority),
            _without_secret(request).encode(),
            key=request.conversation_id.encode(),
        )
    except KafkaError as exc:
        log.error("could not publish job %s: %s", request.job_id, exc)
        await ledger.fail(
            pool,
            request.job_id,
            ErrorInfo(code="enqueue_failed", message="the queue is unavailable"),
        )
        raise EnqueueFailed(str(exc)) from exc
    return job, True


async def submit(
    settings: Settings,
    pool: asyncpg.Pool,
    producer: AIOKafkaProducer,
    submission: JobSubmission,
) -> tuple[ledger.JobRow, bool]:
    """Validate a client's submission against this deployment, then enqueue it."""
    request = to_request(settings, submission)
    await check_webhook(settings, submission.webhook)
    return await enqueue(settings, pool, producer, request, submission.idempotency_key)
