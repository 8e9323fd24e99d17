"""The Kafka-native submission contract: the headers of a submission, and the answer
to one that was refused.

A submission's value is a ``POST /v1/jobs`` body (``schemas.api.JobSubmission``) on
the submissions topic. Its answer comes on its reply topic with the correlation id
as a header: the job's ``JobReply`` (with a ``job-id`` header), or a
``SubmissionRefused`` (without one).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.api import ApiError

AUTHORIZATION_HEADER = "authorization"
"""The tenant's API key: ``Bearer kx_...`` or the bare key."""
REPLY_TOPIC_HEADER = "reply-topic"
"""Where to answer (default: the deployment's reply topic)."""
CORRELATION_ID_HEADER = "correlation-id"
"""Echoed on the answer; also the job's idempotency key (per tenant)."""
CORRELATION_ID_MAX_LENGTH = 255


class SubmissionRefused(BaseModel):
    """The answer to a submission that was not taken (nothing was stored): the error
    body and status ``POST /v1/jobs`` would have answered."""

    model_config = ConfigDict(extra="ignore")

    error: ApiError
    status: int = Field(description="the HTTP status the API gives the same refusal")
    retry_after_s: float | None = Field(
        default=None, description="seconds to wait before sending it again, when known"
    )

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()
