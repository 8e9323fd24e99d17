"""Per-tenant rate limits and token budgets.

The admission stage is the single writer of each tenant's state: its topic is
keyed by tenant, so one partition (one stream processor) sees every submission
and every settlement of a tenant, in order, and decides alone. There is no
shared counter to read and then increment, so any number of API replicas and
workers cannot push a tenant past its limits.

- Requests and tokens per minute: a sliding window of one-second buckets.
- Budget: each admitted job reserves its prompt estimate plus ``max_tokens``;
  its completion settles the reservation to the tokens it actually used.

The API only refuses what is known for sure (the window is full until a known
time, or the budget already spent leaves too little), from the state the
limiter publishes; everything else is decided by the limiter.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import asyncpg

from kontext.settings import Settings
from schemas.events import JobRequest
from schemas.limits import Settled, TenantLimitStatus
from workers.context import budget_for
from workers.engines import context_window
from workers.policies.base import Policy, Refusal

log = logging.getLogger(__name__)

WINDOW_S = 60


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


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    budget: int | None = None


class TenantLimits:
    """Each tenant's limits: the ``tenants`` table's rpm, tpm and token_budget, with
    the settings' defaults where a column is NULL (or no row exists), and the spent
    budget last saved. Re-read every ``limits_refresh_s``, never per request, and at
    once for a tenant not seen at the last read (a new tenant's first request is
    decided with its own limits, not the defaults)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool | None) -> None:
        self.settings = settings
        self.pool = pool
        self.rows: dict[str, tuple[int | None, int | None, int | None]] = {}
        self.saved_spent: dict[str, int] = {}
        self.loaded_at = -math.inf
        self.absent: set[str] = set()
        """Tenants asked for at the last read that have no row (not re-read for them)."""

    async def refresh(self, tenants: Iterable[str] = ()) -> None:
        """Re-read if due, or if one of ``tenants`` was not seen at the last read."""
        now = time.monotonic()
        if self.pool is None:
            return
        asked = set(tenants)
        unseen = asked - self.rows.keys() - self.absent
        if not unseen and now - self.loaded_at < self.settings.limits_refresh_s:
            return
        self.loaded_at = now
        rows = await self.pool.fetch(
            """
            SELECT t.id, t.rpm, t.tpm, t.token_budget, coalesce(s.spent, 0) AS spent
            FROM tenants t LEFT JOIN tenant_budget_spent s ON s.tenant_id = t.id
            """
        )
        self.rows = {r["id"]: (r["rpm"], r["tpm"], r["token_budget"]) for r in rows}
        self.saved_spent = {r["id"]: r["spent"] for r in rows}
        self.absent = asked - self.rows.keys()

    async def save_spent(self, spent: dict[str, int]) -> None:
        """Keep tenants' spent budget in Postgres (one statement; it only grows)."""
        if self.pool is None or not spent:
            return
        await self.pool.execute(
            """
            INSERT INTO tenant_budget_spent (tenant_id, spent)
            SELECT u.tenant_id, u.spent
            FROM unnest($1::text[], $2::bigint[]) AS u(tenant_id, spent)
            JOIN tenants t ON t.id = u.tenant_id
            ON CONFLICT (tenant_id) DO UPDATE
            SET spent = greatest(tenant_budget_spent.spent, excluded.spent), updated_at = now()
            """,
            list(spent),
            list(spent.values()),
        )

    def get(self, tenant_id: str) -> Limits:
        s = self.settings
        rpm, tpm, budget = self.rows.get(tenant_id, (None, None, None))
        return Limits(
            rpm=rpm if rpm is not None else s.default_rpm,
            tpm=tpm if tpm is not None else s.default_tpm,
            budget=budget if budget is not None else s.default_token_budget,
        )


class TenantState:
    """One tenant's window and budget, as a JSON-able dict (the stream table's value).

    ``requests`` / ``tokens``: second -> count in the last minute; ``spent``: settled
    tokens; ``held``: job id -> [budget reserved, second admitted, tokens counted in the
    window]; ``reserved``: the budget reserved in all. ``in_window`` and
    ``tokens_in_window`` are the windows' sums once pruned."""

    def __init__(self, raw: dict[str, Any] | None) -> None:
        raw = raw or {}
        self.requests: dict[str, int] = raw.get("requests", {})
        self.tokens: dict[str, int] = raw.get("tokens", {})
        self.spent: int = raw.get("spent", 0)
        self.held: dict[str, list[int]] = raw.get("held", {})
        self.reserved: int = raw.get("reserved", 0)
        self.in_window = 0
        self.tokens_in_window = 0

    def dump(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "spent": self.spent,
            "held": self.held,
            "reserved": self.reserved,
        }

    def prune(self, now: float) -> None:
        oldest = int(now) - WINDOW_S
        for buckets in (self.requests, self.tokens):
            for second in [k for k in buckets if int(k) <= oldest]:
                del buckets[second]
        self.in_window = sum(self.requests.values())
        self.tokens_in_window = sum(self.tokens.values())

    def frees_at(self, buckets: dict[str, int]) -> float:
        """When the oldest bucket leaves the window."""
        return min(int(k) for k in buckets) + WINDOW_S + 1 if buckets else 0.0


LimitState = MutableMapping[bytes, Any]
"""Where the single writer keeps tenants' state: a faust table keyed by tenant id."""


class LimitView(Protocol):
    """The API's copy of the limiter's published state."""

    def status(self, tenant_id: str) -> TenantLimitStatus | None: ...


class LimitLedger:
    """The limiter's decisions over the single writer's state."""

    def __init__(self, limits: TenantLimits, state: LimitState) -> None:
        self.limits = limits
        self.state = state

    def _load(self, tenant_id: str) -> TenantState:
        raw = self.state.get(tenant_id.encode())
        tenant = TenantState(raw)
        if raw is None:  # new here, or the changelog was lost: resume the saved spend
            tenant.spent = self.limits.saved_spent.get(tenant_id, 0)
        return tenant

    def _save(self, tenant_id: str, tenant: TenantState) -> None:
        self.state[tenant_id.encode()] = tenant.dump()

    async def admit(self, requests: Sequence[JobRequest], now: float) -> dict[UUID, Refusal]:
        await self.limits.refresh({request.tenant_id for request in requests})
        refused: dict[UUID, Refusal] = {}
        tenants: dict[str, TenantState] = {}
        for request in requests:
            tenant = tenants.get(request.tenant_id)
            if tenant is None:
                tenant = tenants[request.tenant_id] = self._load(request.tenant_id)
                tenant.prune(now)
            refusal = self._admit_one(tenant, self.limits.get(request.tenant_id), request, now)
            if refusal is not None:
                refused[request.job_id] = refusal
        for tenant_id, tenant in tenants.items():
            self._save(tenant_id, tenant)
        return refused

    def _admit_one(
        self, tenant: TenantState, limits: Limits, request: JobRequest, now: float
    ) -> Refusal | None:
        job = str(request.job_id)
        if job in tenant.held:
            return None  # delivered again: admitted already, counted once
        cost = reservation(request)
        hold = budget_reservation(self.limits.settings, request)
        # A background job (a batch line) is paced by its lane, not by the per-minute
        # limits, and does not count in them; it holds and spends budget like any job.
        paced = request.priority != "background"
        if paced and limits.rpm is not None and tenant.in_window >= limits.rpm:
            wait = tenant.frees_at(tenant.requests) - now
            return Refusal(
                "rate_limited",
                f"rate limit of {limits.rpm} requests per minute reached; "
                f"retry after {math.ceil(wait)} s",
                retry_after_s=wait,
            )
        if paced and limits.tpm is not None:
            if cost > limits.tpm:
                return Refusal(
                    "rate_limited",
                    f"the request may use {cost} tokens, over the limit of {limits.tpm} "
                    "tokens per minute; lower max_tokens",
                    status=422,
                )
            if tenant.tokens_in_window + cost > limits.tpm:
                wait = tenant.frees_at(tenant.tokens) - now
                return Refusal(
                    "rate_limited",
                    f"rate limit of {limits.tpm} tokens per minute reached; "
                    f"retry after {math.ceil(wait)} s",
                    retry_after_s=wait,
                )
        if limits.budget is not None:
            left = limits.budget - tenant.spent - tenant.reserved
            if hold > left:
                return Refusal(
                    "budget_exhausted",
                    f"the token budget of {limits.budget} has {max(left, 0)} tokens left "
                    f"(not spent nor held by jobs in flight); this request may use {hold}",
                    status=402,
                )
        tenant.reserved += hold
        if not paced:
            tenant.held[job] = [hold, -1, 0]  # second -1: settling touches no window
            return None
        second = str(int(now))
        tenant.requests[second] = tenant.requests.get(second, 0) + 1
        tenant.tokens[second] = tenant.tokens.get(second, 0) + cost
        tenant.held[job] = [hold, int(now), cost]
        tenant.in_window += 1
        tenant.tokens_in_window += cost
        return None

    def settle(self, settlements: Sequence[Settled], now: float) -> set[str]:
        """Settle reservations to actual use; returns the tenants touched. A job settled
        twice (or never reserved: refused, summaries, backfills) changes nothing."""
        tenants: dict[str, TenantState] = {}
        for done in settlements:
            tenant = tenants.get(done.tenant_id)
            if tenant is None:
                tenant = tenants[done.tenant_id] = self._load(done.tenant_id)
                tenant.prune(now)
            held = tenant.held.pop(str(done.job_id), None)
            if held is None:
                continue
            reserved, second, counted = held
            tenant.reserved -= reserved
            tenant.spent += done.tokens
            key = str(second)
            if key in tenant.tokens:
                tenant.tokens[key] = max(0, tenant.tokens[key] + done.tokens - counted)
        for tenant_id, tenant in tenants.items():
            self._save(tenant_id, tenant)
        return set(tenants)

    def spent(self, tenant_ids: Iterable[str]) -> dict[str, int]:
        return {t: self._load(t).spent for t in tenant_ids}

    def status(self, tenant_id: str, now: float) -> TenantLimitStatus:
        """What the API may know: a window full until when, and the budget spent."""
        tenant = self._load(tenant_id)
        tenant.prune(now)
        limits = self.limits.get(tenant_id)
        blocked_until: float | None = None
        blocked_by: str | None = None
        if limits.rpm is not None and tenant.in_window >= limits.rpm:
            blocked_until, blocked_by = tenant.frees_at(tenant.requests), "rpm"
        elif limits.tpm is not None and tenant.tokens_in_window >= limits.tpm:
            blocked_until, blocked_by = tenant.frees_at(tenant.tokens), "tpm"
        return TenantLimitStatus(
            tenant_id=tenant_id,
            blocked_until=blocked_until,
            blocked_by=blocked_by,  # type: ignore[arg-type]
            budget=limits.budget,
            budget_spent=tenant.spent,
        )


class LimitsPolicy(Policy):
    """The limits step: refuses early at the API from published state, decides in the
    admission stage as the tenant's single writer."""

    name = "limits"

    def __init__(
        self,
        limits: TenantLimits,
        *,
        view: LimitView | None = None,
        state: LimitState | None = None,
    ) -> None:
        self.view = view
        self.settings = limits.settings
        self.ledger = LimitLedger(limits, state) if state is not None else None

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

    async def admit(self, requests: Sequence[JobRequest]) -> dict[UUID, Refusal]:
        if self.ledger is None:
            return {}
        return await self.ledger.admit(requests, time.time())
