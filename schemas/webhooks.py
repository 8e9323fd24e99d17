"""HTTP bodies of the webhook deliveries API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

DeliveryStatus = Literal["pending", "delivered", "dead"]


class AttemptView(BaseModel):
    """One try: the receiver's status code (None if none came back), latency, error."""

    attempt: int
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None


class DeliveryView(BaseModel):
    """A job's (or a batch's) webhook delivery and every attempt so far (``webhook-id`` is
    ``id``)."""

    id: UUID
    job_id: UUID | None
    batch_id: UUID | None = None
    event_type: str
    url: str
    status: DeliveryStatus
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    attempts: list[AttemptView]


class DeliveryList(BaseModel):
    data: list[DeliveryView]


EventPattern = Literal[
    "job.completed",
    "job.failed",
    "batch.completed",
    "batch.failed",
    "batch.cancelled",
    "batch.expired",
    "job.*",
    "batch.*",
    "*",
]
"""An event type an endpoint subscribes to, a family of them, or every one."""


def _every_event() -> list[EventPattern]:
    return ["*"]


class EndpointCreate(BaseModel):
    """A webhook endpoint for every job and batch of the caller's tenant."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    events: list[EventPattern] = Field(
        default_factory=_every_event,
        min_length=1,
        description="event types, a family (job.*, batch.*) or * (the default)",
    )
    description: str | None = Field(default=None, max_length=500)


class EndpointView(BaseModel):
    """A registered endpoint; its secret is shown once, in the answer that creates it."""

    id: UUID
    url: str
    events: list[str]
    description: str | None
    created_at: datetime
    secret: str | None = Field(default=None, description="whsec_...; only when created")


class EndpointList(BaseModel):
    data: list[EndpointView]
