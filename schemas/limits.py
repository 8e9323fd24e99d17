"""Events of the limits and the router: tenants' published limit state, and inference
workers' heartbeats."""

from __future__ import annotations

from typing import Literal

from schemas.events import Event


class TenantLimitStatus(Event):
    """What the enricher knows for sure about a tenant's limits, for the API to refuse
    early.

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
