"""The one place the policy chain is built from settings.

Every service that runs policy hooks builds its chain here, so the order of
the steps is decided once: the API (``check_submit``), the admission stage
(``admit``) and the inference workers (``before_engine`` / ``after_engine``).
Each step gets only what it needs from ``ChainParts``; a step whose part is
missing in this service (e.g. the limiter's state outside the admission stage)
still runs, and lets through what it cannot decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from kontext.settings import Settings
from workers.policies.base import Policy
from workers.policies.cache import ResponseCache
from workers.policies.chain import PolicyChain
from workers.policies.limits import LimitsPolicy, LimitState, LimitView, TenantLimits
from workers.policies.redaction import PiiRedaction
from workers.policies.review import HumanReview


@dataclass
class ChainParts:
    """What one service can give the steps: all optional, by service."""

    pool: asyncpg.Pool | None = None
    limit_view: LimitView | None = None
    """The API's copy of the limiter's published per-tenant state (``check_submit``)."""
    limit_state: LimitState | None = None
    """The limiter's own per-tenant state: the single writer's table (``admit``)."""


def build_steps(settings: Settings, parts: ChainParts) -> list[Policy]:
    """The steps in order: limits first (a refused job costs nothing more), then the
    inference-side steps (review, then cache)."""
    steps: list[Policy] = []
    if settings.redact_pii:  # first: no other step, nor anything stored, sees the PII
        steps.append(PiiRedaction(settings.pii_region))
    if settings.policy_limits:
        limits = TenantLimits(settings, parts.pool)
        steps.append(LimitsPolicy(limits, view=parts.limit_view, state=parts.limit_state))
    # Review before cache: a result held for review is never written to the cache.
    if parts.pool is not None and (
        settings.review_patterns or settings.review_logprob_threshold is not None
    ):
        steps.append(
            HumanReview(parts.pool, settings.review_logprob_threshold, settings.review_patterns)
        )
    if parts.pool is not None and settings.cache_ttl_s > 0:
        steps.append(ResponseCache(parts.pool, settings.cache_ttl_s))
    return steps


def build_chain(settings: Settings, parts: ChainParts | None = None) -> PolicyChain:
    """The policy chain of one service."""
    return PolicyChain(build_steps(settings, parts or ChainParts()))
