"""HTTP bodies of the webhook deliveries API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel

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
