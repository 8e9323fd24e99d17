"""The one place the policy chain is built from settings.

Every service that runs policy hooks builds its chain here, so the order of
the steps is decided once: the API (``rewrite_request``, ``check_submit``) and the
inference workers (``before_engine`` / ``rewrite_completion`` / ``after_engine``).
Each step gets only what it needs from ``ChainParts``; a step whose part is
missing in this service (e.g. the limits' published state outside the API)
still runs, and lets through what it cannot decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from kontext.settings import Settings
from workers.policies.base import Policy
from workers.policies.cache import ResponseCache
from workers.policies.chain import PolicyChain
from workers.policies.limits import LimitsPolicy, LimitView
from workers.policies.redaction import PiiRedaction
from workers.policies.review import HumanReview
from workers.policies.stopped_batches import StoppedBatches


@dataclass
class ChainParts:
    """What one service can give the steps: all optional, by service."""

    pool: asyncpg.Pool | None = None
    limit_view: LimitView | None = None
    """The API's copy of the tenants' published limit state (``check_submit``)."""


def build_steps(settings: Settings, parts: ChainParts) -> list[Policy]:
    """The steps in order: limits first (a refused job costs nothing more), then the
    inference-side steps (stopped batches, review, then cache)."""
    steps: list[Policy] = []
    if settings.redact_pii:  # first: no other step, nor anything stored, sees the PII
        steps.append(PiiRedaction(settings.pii_region))
    if settings.policy_limits:
        steps.append(LimitsPolicy(settings, parts.limit_view))
    if parts.pool is not None:  # before the others: a stopped batch's line costs nothing more
        steps.append(StoppedBatches(parts.pool))
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
