"""Per-tenant rate limits and token budgets.

Each tenant's state lives in Postgres and is decided there: the enricher's one
round trip per micro-batch (``kontext.store.enrichment``) takes the tenant's row
lock and decides its jobs in order, so any number of API replicas and enrichers
cannot push a tenant past its limits; a job turning final settles what it held
(a trigger on the jobs ledger, migration 0013).

- Requests and tokens per minute: a sliding window of one-second buckets.
- Budget: each admitted job holds its prompt estimate plus ``max_tokens``; its
  completion settles the hold to the tokens it actually used.

This step refuses at the API only what is known for sure (the window is full
until a known time, or the budget already spent leaves too little), from the
state the enrichers publish on the limits topic; everything else is decided by
the enricher.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from kontext.settings import Settings
from schemas.events import JobRequest
from schemas.limits import TenantLimitStatus
from workers.context import budget_for
from workers.engines import context_window
from workers.policies.base import Policy, Refusal


def reservation(request: JobRequest) -> int:
    """Tokens a job counts in its tokens-per-minute window until it settles: a prompt
    estimate (about four characters a token, plus a few per message) and its
    ``max_tokens``."""
    chars = sum(len(m.content) for m in request.messages)
    return chars // 4 + 4 * len(request.messages) + request.max_tokens


def budget_reservation(settings: Settings, request: JobRequest) -> int:
    """Tokens a job holds against its tenant's budget until it settles. With
    ``budget_reserve=max``: the most it can use, whatever memory adds to its prompt
    and whichever served model answers it (a fallback may have a larger window)."""
    if settings.budget_reserve == "estimate":
        return reservation(request)
    window = max(context_window(model) for model in settings.engines)
    return budget_for(request, window, settings.context_budget_tokens) + request.max_tokens


class LimitView(Protocol):
    """The API's copy of the limiter's published state."""

    def status(self, tenant_id: str) -> TenantLimitStatus | None: ...


class LimitsPolicy(Policy):
    """The limits step: refuses early at the API from the published state (the
    enricher decides, see the module docstring)."""

    name = "limits"

    def __init__(self, settings: Settings, view: LimitView | None = None) -> None:
        self.view = view
        self.settings = settings

    async def check_submit(self, request: JobRequest) -> Refusal | None:
        status = self.view.status(request.tenant_id) if self.view is not None else None
        if status is None:
            return None
        now = time.time()
        if status.blocked_until is not None and status.blocked_until > now:
            unit = "requests" if status.blocked_by == "rpm" else "tokens"
            wait = status.blocked_until - now
            return Refusal(
                "rate_limited",
                f"the {unit}-per-minute limit is reached; retry after {math.ceil(wait)} s",
                retry_after_s=wait,
            )
        if status.budget is not None:
            left = status.budget - status.budget_spent
            hold = budget_reservation(self.settings, request)
            if hold > left:
                return Refusal(
                    "budget_exhausted",
                    f"the token budget of {status.budget} has at most {max(left, 0)} tokens "
                    f"left; this request may use {hold}",
                    status=402,
                )
        return None
