"""Admitting a job: validate against the deployment, record it in the ledger, publish it."""

from __future__ import annotations

import contextlib
import logging
import uuid

from aiokafka import AIOKafkaProducer
from opentelemetry import trace

from kontext import tracing
from kontext.settings import Settings
from kontext.ssrf import UrlGuard, UrlRefused
from kontext.store import ledger
from schemas.api import JobSubmission
from schemas.events import JobRequest, ReplyRoute, WebhookTarget
from workers.context import SAFETY_MARGIN_TOKENS
from workers.engines import context_window
from workers.intake import enqueue
from workers.policies.base import Refused
from workers.policies.chain import PolicyChain

log = logging.getLogger(__name__)

MIN_PROMPT_TOKENS = 64
"""Prompt tokens a request's ``max_tokens`` must leave in its model's context window
(a system prompt and a short message)."""


class SubmissionRejected(Exception):
    """A well-formed submission this deployment cannot take (nothing was stored)."""

    def __init__(self, code: str, message: str, *, served_models: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.served_models = served_models


ASKED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "logprobs",
        "user",
        "recall_scope",
        "include_prompt",
        "metadata",
        "webhook",
    }
)
"""What a request asks, as its submission gave it: two submissions with one idempotency
key must agree on these (and on the conversation, when the later one names it)."""


def asks_the_same(earlier: JobRequest, request: JobRequest, conversation_named: bool) -> bool:
    """Whether ``request`` asks what ``earlier`` asked (a retry, not a new request)."""
    fields = {*ASKED, "conversation_id"} if conversation_named else set(ASKED)
    return earlier.model_dump(include=fields) == request.model_dump(include=fields)


def to_request(
    settings: Settings,
    submission: JobSubmission,
    *,
    tenant_id: str = "default",
    key_id: uuid.UUID | None = None,
    reply_to: ReplyRoute | None = None,
) -> JobRequest:
    """The event for a tenant's submission, or SubmissionRejected. A model alias
    (``KONTEXT_MODEL_ALIASES``) is resolved to the model it names; ``reply_to`` is
    where a submission from the submissions topic is answered."""
    model = settings.model_aliases.get(submission.model, submission.model)
    if model not in settings.engines:
        raise SubmissionRejected(
            "unknown_model",
            f"model {submission.model!r} is not served here; served models: "
            + ", ".join(settings.engines),
            served_models=list(settings.engines),
        )
    if len(submission.messages) > settings.max_messages:
        raise SubmissionRejected(
            "too_many_messages",
            f"at most {settings.max_messages} messages a request, got"
            f" {len(submission.messages)}; continue a conversation (conversation_id) to"
            " send only the new ones",
        )
    max_tokens = submission.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise SubmissionRejected(
            "max_tokens_out_of_range",
            f"max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}",
        )
    window = context_window(model)
    roomy = window - SAFETY_MARGIN_TOKENS - MIN_PROMPT_TOKENS
    if max_tokens > roomy:
        raise SubmissionRejected(
            "max_tokens_out_of_range",
            f"max_tokens {max_tokens} leaves no room for the prompt in the"
            f" {window}-token context window of model {model}: at most {roomy}",
        )
    return JobRequest(
        job_id=uuid.uuid4(),
        conversation_id=submission.conversation_id or uuid.uuid4().hex,
        tenant_id=tenant_id,
        key_id=key_id,
        model=model,
        messages=submission.messages,
        max_tokens=max_tokens,
        temperature=submission.temperature,
        top_p=submission.top_p,
        stop=submission.stop or [],
        logprobs=submission.logprobs,
        user=submission.user,
        recall_scope=submission.recall_scope,
        include_prompt=submission.include_prompt,
        metadata=submission.metadata,
        webhook=submission.webhook.published() if submission.webhook else None,
        reply_to=reply_to,
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


async def submit(
    settings: Settings,
    admitter: ledger.Admitter,
    producer: AIOKafkaProducer,
    submission: JobSubmission,
    *,
    tenant_id: str = "default",
    key_id: uuid.UUID | None = None,
    chain: PolicyChain | None = None,
    reply_to: ReplyRoute | None = None,
) -> tuple[ledger.JobRow, bool]:
    """Validate a tenant's submission against this deployment and the policy chain's
    ``check_submit`` (which raises Refused), then enqueue it. A known idempotency key
    returns its job (with its request), unless that job asked for something else:
    SubmissionRejected ``idempotency_key_reused``."""
    request = to_request(
        settings, submission, tenant_id=tenant_id, key_id=key_id, reply_to=reply_to
    )
    if chain is not None:
        request = chain.rewrite_request(request)
        refusal = await chain.check_submit(request)
        if refusal is not None:
            raise Refused(refusal)
    await check_webhook(settings, submission.webhook)
    secret = submission.webhook.secret if submission.webhook else None
    try:
        with _intake_span(request):
            job, created = await enqueue(
                settings, admitter, producer, request, submission.idempotency_key, secret
            )
    except ledger.ConversationNotOwned:
        # Another tenant's conversation: answered like one that does not exist.
        raise SubmissionRejected(
            "conversation_not_found",
            f"no conversation {request.conversation_id}; choose another conversation_id",
        ) from None
    if not created and job.request is not None:
        earlier = JobRequest.model_validate(job.request)
        if not asks_the_same(earlier, request, submission.conversation_id is not None):
            raise SubmissionRejected(
                "idempotency_key_reused",
                f"idempotency key {submission.idempotency_key!r} was used for another"
                f" request (job {job.id}); send this one with a new key",
            )
    return job, created


def _intake_span(request: JobRequest) -> contextlib.AbstractContextManager[object]:
    """The job's ``submit`` span, current while it is recorded and published (its
    ``traceparent`` goes with the request); nothing while tracing is off."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    span = tracing.start(
        "submit",
        None,
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "kontext.job_id": str(request.job_id),
            "kontext.conversation_id": request.conversation_id,
            "kontext.tenant_id": request.tenant_id,
            "kontext.model": request.model,
            "kontext.priority": request.priority,
        },
    )
    return trace.use_span(span, end_on_exit=True)
