"""HTTP bodies of the batches API, and the lines of its output and error files
(the OpenAI Batch formats)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import WebhookTarget

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
ENDED: tuple[BatchStatus, ...] = ("failed", "completed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


class BatchCreate(BaseModel):
    """``POST /v1/batches`` as JSON: the input file's text and the batch's options."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    input: str = Field(min_length=1, description="OpenAI Batch input: one JSON request per line")
    endpoint: Literal["/v1/chat/completions"] = "/v1/chat/completions"
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook: WebhookTarget | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


class LineError(BaseModel):
    """Why one input line was refused (1-based ``line``)."""

    code: str
    message: str
    line: int
    custom_id: str | None = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchView(BaseModel):
    """``GET /v1/batches/{id}``: an OpenAI Batch object, with the bad lines in ``errors``."""

    id: UUID
    object: Literal["batch"] = "batch"
    endpoint: str
    status: BatchStatus
    completion_window: str
    request_counts: RequestCounts
    metadata: dict[str, Any]
    errors: list[LineError]
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None


class OutputResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class OutputError(BaseModel):
    code: str
    message: str
    line: int | None = None


class OutputLine(BaseModel):
    """One line of the output file (``response`` set) or the error file (``error`` set)."""

    id: str | None
    custom_id: str | None
    response: OutputResponse | None = None
    error: OutputError | None = None
