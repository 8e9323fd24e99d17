"""Events of the limiter and the router: the admission topic, the limiter's published
state, and inference workers' heartbeats."""

from __future__ import annotations

from typing import Annotated, Literal, Self
from uuid import UUID

from pydantic import Field, TypeAdapter, model_validator

from schemas.events import Event, JobRequest


class Submitted(Event):
    """A submission waiting for the limiter (admission topic, keyed by tenant)."""

    type: Literal["submitted"] = "submitted"
    request: JobRequest


class SubmittedMany(Event):
    """Several submissions of one tenant in one event (admission topic, keyed by
    tenant): a batch's intake chunk, decided in order like as many ``Submitted``."""

    type: Literal["submitted_many"] = "submitted_many"
    requests: list[JobRequest] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_tenant(self) -> Self:
        """Keyed by one tenant, it must hold only that tenant's submissions (each tenant
        has a single writer)."""
        if len({request.tenant_id for request in self.requests}) > 1:
            raise ValueError("the requests of one event belong to one tenant")
        return self


class Settled(Event):
    """A job's actual token use, sent back to its tenant's limiter to settle its
    reservation (admission topic, keyed by tenant)."""

    type: Literal["settled"] = "settled"
    job_id: UUID
    tenant_id: str
    tokens: int = Field(ge=0)


class Released(Event):
    """Jobs of one tenant that ended before running (a batch's queued lines, cancelled
    or expired): their reservations are released, nothing spent (admission topic,
    keyed by tenant)."""

    type: Literal["released"] = "released"
    tenant_id: str
    job_ids: list[UUID] = Field(min_length=1)


AdmissionEvent = Annotated[
    Submitted | SubmittedMany | Settled | Released, Field(discriminator="type")
]
ADMISSION_EVENT: TypeAdapter[Submitted | SubmittedMany | Settled | Released] = TypeAdapter(
    AdmissionEvent
)


class TenantLimitStatus(Event):
    """What the limiter knows for sure about a tenant, for the API to refuse early.

    ``blocked_until`` (unix seconds): the requests- or tokens-per-minute window is
    full until then. ``budget_spent`` only grows, so ``budget - budget_spent``
    bounds what any request can still get."""

    tenant_id: str
    blocked_until: float | None = None
    blocked_by: Literal["rpm", "tpm"] | None = None
    budget: int | None = None
    budget_spent: int = 0


class WorkerHeartbeat(Event):
    """An inference worker is alive; ``lag`` is how many records its consumer is behind."""

    model: str
    worker_id: str
    at: float
    lag: int | None = None
