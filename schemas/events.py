"""Versioned pydantic events: the payloads of every topic.

Each event carries ``version``; consumers accept the versions they know and
dead-letter the rest. Serialise with ``encode`` and parse with ``decode`` so
every topic uses the same JSON form.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]
FinalStatus = Literal["succeeded", "failed"]
JobKind = Literal["chat", "summary"]
"""``chat`` turns join their conversation's memory; ``summary`` jobs write it."""
Priority = Literal["interactive", "background"]
"""Inference lane: background work (summaries, backfills) never starves interactive turns,
and keeps a guaranteed share of every micro-batch itself."""
RecallScope = Literal["conversation", "user"]
"""Where recall looks: this conversation, or all of the same user's conversations."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class ChatMessage(BaseModel):
    """One OpenAI-style chat message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str


class Event(BaseModel):
    """Base of every topic payload."""

    model_config = ConfigDict(extra="ignore", ser_json_bytes="base64", val_json_bytes="base64")

    version: Literal[1] = 1

    @field_validator("version", mode="before")
    @classmethod
    def _integer_version(cls, value: object) -> object:
        """A version is an integer: ``1.0`` or ``true`` is not version 1 (it is dead-lettered)."""
        if type(value) is not int:
            raise ValueError(f"version must be an integer, got {value!r}")
        return value

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> Self:
        if raw is None:
            raise ValueError("empty message (tombstone)")
        return cls.model_validate_json(raw)


class ErrorInfo(BaseModel):
    """Why a job failed, in words a client can show."""

    code: str
    message: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SummaryRef(BaseModel):
    """A stored summary that went into a prompt."""

    level: int
    first_seq: int
    last_seq: int


class MemoryRef(BaseModel):
    """An older turn recalled by similarity to the new message."""

    conversation_id: str
    seq: int
    similarity: float


class ContextInfo(BaseModel):
    """What went into a prompt, so clients can see why the model answered as it did."""

    prompt_tokens: int
    budget_tokens: int | None = None
    turns: list[int] = Field(default_factory=list, description="seq of each recent turn used")
    summaries: list[SummaryRef] = Field(default_factory=list)
    memories: list[MemoryRef] = Field(default_factory=list)
    truncated: bool = Field(default=False, description="a new message was cut to fit")
    prompt: str | None = Field(default=None, description="the rendered prompt, on request")
    cached: bool = Field(default=False, description="answered from the response cache")
    routed_from: str | None = Field(
        default=None, description="the model asked for, when a fallback model answered"
    )
    review: Literal["approved", "replaced"] | None = Field(
        default=None, description="a reviewer's decision on a result held for human review"
    )


class TurnRecord(BaseModel):
    """A turn to store once its job succeeds."""

    role: Role
    content: str
    tokens: int


WEBHOOK_SECRET_PREFIX = "whsec_"


def _check_webhook_secret(value: str) -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 to 64 bytes in base64."""
    if not value.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError("a webhook secret has the form whsec_<base64>")
    try:
        key = base64.b64decode(value.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret must be base64 after whsec_") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("a webhook secret must hold 24 to 64 bytes")
    return value


WebhookSecret = Annotated[str, AfterValidator(_check_webhook_secret)]


class WebhookTarget(BaseModel):
    """Where a client asks a result to be pushed (API bodies); signed with ``secret`` or
    the deployment's. The secret stays in Postgres (``jobs.webhook_secret``): what a
    job's request carries on the topics is its ``JobWebhook``, which has no place for it."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = Field(min_length=1, max_length=2048)
    secret: WebhookSecret | None = Field(default=None, repr=False)

    def published(self) -> JobWebhook:
        """The target as a job's request carries it: its URL only."""
        return JobWebhook(url=self.url)


class JobWebhook(BaseModel):
    """A job's webhook as its request travels the topics and the ledger's ``request``:
    the URL only, never a secret (an old message's ``secret`` is dropped on reading)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    url: str = Field(min_length=1, max_length=2048)


class ReplyRoute(BaseModel):
    """Where a job submitted on the submissions topic is answered: the reply topic its
    submitter named, and the correlation id its reply carries back as a header."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    topic: str
    correlation_id: str


class JobRequest(Event):
    """An admitted job on the requests topic (keyed by conversation id)."""

    job_id: UUID
    conversation_id: str
    tenant_id: str = "default"
    key_id: UUID | None = None
    """The API key that submitted the job (None: internal work such as summaries)."""
    model: str
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    """Nucleus sampling at temperatures above 0 (1: every token)."""
    stop: list[str] = Field(default_factory=list)
    """Stop sequences: the answer ends before the first of them it produces."""
    logprobs: bool = False
    """Return each generated token with its log-probability."""
    kind: JobKind = "chat"
    priority: Priority = "interactive"
    user: str | None = None
    recall_scope: RecallScope = "conversation"
    include_prompt: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook: JobWebhook | None = None
    reply_to: ReplyRoute | None = None
    """Set for a job from the submissions topic: its reply goes there (the ledger keeps
    it in the job's request, so a re-driven job is answered there too)."""
    batch_id: UUID | None = None
    """The batch this job is a line of (None: not a batch line). A line whose batch was
    cancelled or expired fails before the engine runs it."""
    submitted_at: datetime = Field(default_factory=utcnow)


class EnrichedRequest(Event):
    """A request with its prompt assembled from conversation memory."""

    request: JobRequest
    prompt: str
    context: ContextInfo
    new_turns: list[TurnRecord]
    enriched_at: datetime = Field(default_factory=utcnow)


class JobCompletion(Event):
    """An engine's answer (or a failure), waiting to be recorded."""

    job_id: UUID
    conversation_id: str
    tenant_id: str = "default"
    model: str
    status: FinalStatus
    output: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    context: ContextInfo | None = None
    new_turns: list[TurnRecord] = Field(default_factory=list)
    completed_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = None
    """When the job was submitted (for the end-to-end latency metric)."""
    mean_logprob: float | None = None
    """The engine's mean token log-probability of ``output``, when it reports one."""
    logprobs: list[TokenLogprob] | None = None
    """Each generated token with its log-probability, when the request asked for them."""
    enriched_at: datetime | None = None
    """When the enricher sent the job on (its timeline; None when it never was)."""
    batched_at: datetime | None = None
    """When the engine call of the job's micro-batch began."""
    generated_at: datetime | None = None
    """When the engine gave the job's answer: when the call returned, or with an engine
    that batches continuously, when the job's own request ended."""

    @classmethod
    def failure(
        cls, request: JobRequest, error: ErrorInfo, context: ContextInfo | None = None
    ) -> JobCompletion:
        """The completion of a job that failed (refused, unrunnable, or the engine's error)."""
        return cls(
            job_id=request.job_id,
            conversation_id=request.conversation_id,
            tenant_id=request.tenant_id,
            model=request.model,
            status="failed",
            error=error,
            context=context,
            submitted_at=request.submitted_at,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TokenLogprob(BaseModel):
    """A generated token and its log-probability, as OpenAI's ``logprobs.content``
    items; no alternatives are given (``top_logprobs`` is always empty)."""

    token: str = Field(description="its text (U+FFFD for part of a character)")
    logprob: float
    bytes: list[int] = Field(description="its UTF-8 bytes; a character may span tokens")
    top_logprobs: tuple[()] = ()


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """A result shaped like OpenAI's chat.completion, plus Kontext's context metadata."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    context: ContextInfo | None = None

    @classmethod
    def from_completion(cls, done: JobCompletion) -> ChatCompletion:
        if done.output is None or done.usage is None:
            raise ValueError("only a succeeded completion has a chat.completion form")
        return cls(
            id=f"chatcmpl-{done.job_id}",
            created=int(done.completed_at.timestamp()),
            model=done.model,
            choices=[
                Choice(
                    message=AssistantMessage(content=done.output),
                    finish_reason=done.finish_reason,
                    logprobs=None
                    if done.logprobs is None
                    else ChoiceLogprobs(content=done.logprobs),
                )
            ],
            usage=done.usage,
            context=done.context,
        )


class JobReply(Event):
    """A recorded final result on the reply topic, for async clients."""

    job_id: UUID
    conversation_id: str
    tenant_id: str = "default"
    status: FinalStatus
    result: ChatCompletion | None = None
    error: ErrorInfo | None = None


class DeadLetter(Event):
    """A message no consumer could handle, with the reason and its original bytes."""

    source_topic: str
    partition: int
    offset: int
    consumer: str
    reason: str
    key: bytes | None = None
    value: bytes | None = None
    failed_at: datetime = Field(default_factory=utcnow)
