"""HTTP bodies of the batches API (OpenAI's Batch objects), and the lines of a batch's
output and error files (the OpenAI Batch formats)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.api import storable
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


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, split at newlines alone (a JSON string may hold
    U+2028, U+0085 and their kin raw), each without its CRLF's CR, a leading BOM skipped."""
    return [line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n")]


class BatchCreate(BaseModel):
    """``POST /v1/batches``: an uploaded input file (purpose ``batch``) and the batch's
    options, as OpenAI takes them; ``webhook`` and ``idempotency_key`` are Kontext's."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    input_file_id: str = Field(min_length=1, max_length=64, description="A file-... id")
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    output_expires_after: dict[str, Any] | None = Field(
        default=None, description="Accepted and ignored: output files stay until deleted"
    )
    webhook: WebhookTarget | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)

    @model_validator(mode="after")
    def _storable(self) -> BatchCreate:
        stored = self.model_dump(mode="python", exclude_none=True, exclude={"output_expires_after"})
        storable(stored, "")
        return self


class LineError(BaseModel):
    """Why one input line was refused (1-based ``line``), as the batch records it."""

    code: str
    message: str
    line: int
    custom_id: str | None = None


class BatchError(BaseModel):
    """One refused input line in a batch's ``errors`` (OpenAI's BatchError)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchView(BaseModel):
    """``GET /v1/batches/{id}``: an OpenAI Batch object; timestamps in Unix seconds.

    ``errors`` lists the bad input lines (null when there are none); the output and
    error files are set once the batch has ended (null when it has no line for one)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str | None
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    request_counts: RequestCounts
    metadata: dict[str, Any]
    created_at: int
    expires_at: int
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def bad_lines(self) -> list[BatchError]:
        return self.errors.data if self.errors is not None else []


class BatchList(BaseModel):
    """``GET /v1/batches``: a page of batches, newest first."""

    object: Literal["list"] = "list"
    data: list[BatchView]
    first_id: str | None
    last_id: str | None
    has_more: bool


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
