"""HTTP bodies of the public API (requests and responses)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from schemas.events import (
    ChatCompletion,
    ChatMessage,
    ErrorInfo,
    RecallScope,
    WebhookTarget,
)

FINAL_STATUSES = ("succeeded", "failed")
"""A job in one of these has its answer (or its error) and changes no more."""

CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
INT64_RANGE = (-(2**63), 2**64 - 1)
"""Integers JSON (orjson) and the jsonb ledger can hold."""
MAX_STOP_SEQUENCES = 4
"""Stop sequences a request may name, as OpenAI allows."""


def _listed(value: object) -> object:
    """One stop sequence as a string, as OpenAI allows, becomes a list of one."""
    return [value] if isinstance(value, str) else value


StopSequences = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=256)]],
    BeforeValidator(_listed),
    Field(max_length=MAX_STOP_SEQUENCES),
]
"""``stop``: up to four strings; the answer ends before the first one it produces."""


def storable(value: object, where: str = "body") -> None:
    """Raise ValueError for what Postgres and the topics cannot hold: NUL characters,
    lone surrogates, integers beyond 64 bits (in any string, key or number, nested)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: NUL characters are not allowed")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{where}: not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            raise ValueError(f"{where}: integer out of the 64-bit range")
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key, where)
            storable(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            storable(item, f"{where}[{index}]")


class JobSubmission(BaseModel):
    """``POST /v1/jobs``: an OpenAI-style chat request, plus Kontext's job fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    conversation_id: str | None = Field(default=None, pattern=CONVERSATION_ID_PATTERN)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stop: StopSequences | None = None
    logprobs: bool = False
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    user: str | None = Field(
        default=None, min_length=1, max_length=128, description="the end user, for recall scope"
    )
    recall_scope: RecallScope = "conversation"
    metadata: dict[str, Any] = Field(default_factory=dict)
    include_prompt: bool = False
    webhook: WebhookTarget | None = None

    @model_validator(mode="after")
    def _user_scope_needs_user(self) -> JobSubmission:
        if self.recall_scope == "user" and self.user is None:
            raise ValueError("recall_scope 'user' needs the 'user' field")
        return self

    @model_validator(mode="after")
    def _storable(self) -> JobSubmission:
        storable(self.model_dump(mode="python", exclude_none=True), "")
        return self

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        if any(not m.content.strip() for m in messages):
            raise ValueError("message content must not be empty")
        return messages


class JobAccepted(BaseModel):
    """The immediate answer to a submission (202)."""

    id: UUID
    status: str
    conversation_id: str


JobStatus = Literal["queued", "running", "needs_review", "succeeded", "failed"]


class JobTimeline(BaseModel):
    """When a job reached each stage (None: not reached, or not for this job), from the
    ledger: ``GET /v1/jobs/{id}?timeline=true`` and the dashboard's waterfall."""

    accepted: datetime = Field(description="recorded in the ledger by an intake")
    admitted: datetime | None = Field(
        default=None, description="claimed by the enricher (limits and order gate passed)"
    )
    enriched: datetime | None = Field(
        default=None, description="its prompt assembled from memory and sent on"
    )
    batched: datetime | None = Field(
        default=None, description="its micro-batch's engine call began"
    )
    generated: datetime | None = Field(default=None, description="that engine call returned")
    recorded: datetime | None = Field(default=None, description="finalised by the recorder")
    replied: datetime | None = Field(
        default=None, description="its reply published (as the ledger remembers it)"
    )
    delivered: datetime | None = Field(
        default=None, description="its first webhook delivery succeeded"
    )


class JobView(BaseModel):
    """``GET /v1/jobs/{id}``: status, and the chat.completion once succeeded."""

    id: UUID
    status: JobStatus
    conversation_id: str
    model: str
    created_at: datetime
    completed_at: datetime | None = None
    result: ChatCompletion | None = None
    error: ErrorInfo | None = None
    timeline: JobTimeline | None = Field(
        default=None, description="when it reached each stage, with ?timeline=true"
    )


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}
"""OpenAI's error ``type`` for a status (5xx not listed: ``server_error``)."""


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ApiError(BaseModel):
    """An error in OpenAI's shape (``message``, ``type``, ``param``, ``code``), so
    OpenAI clients raise their own exception types; plus Kontext's details."""

    code: str
    message: str
    type: str | None = None
    param: str | None = None
    details: list[dict[str, Any]] | None = None
    served_models: list[str] | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {"code", "message", ...}}``."""

    error: ApiError


class TurnView(BaseModel):
    seq: int
    role: str
    content: str
    tokens: int
    job_id: UUID | None
    embedded: bool
    created_at: datetime


class SummaryView(BaseModel):
    level: int
    first_seq: int
    last_seq: int
    content: str
    tokens: int
    rolled_up: bool
    created_at: datetime


class ConversationView(BaseModel):
    """``GET /v1/conversations/{id}``: what Kontext remembers of a conversation."""

    id: str
    user_id: str | None
    created_at: datetime
    updated_at: datetime
    turns: list[TurnView]
    summaries: list[SummaryView]
