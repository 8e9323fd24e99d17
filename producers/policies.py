"""The intakes' side of the policy chain (the HTTP API and the submissions gateway):
the ``check_submit`` hook's inputs.

``LimitFollower`` keeps this replica's copy of the limiter's published
per-tenant state (the limits topic, read whole by every replica), so refusing
a tenant whose window is full costs no database or broker round trip on the
request path. A ``Refused`` submission is answered with the refusal's status, the
error body and, when known, ``Retry-After`` (``producers.refusals``).
"""

from __future__ import annotations

import logging

from kontext.settings import Settings
from schemas.limits import TenantLimitStatus
from workers.follower import TopicFollower
from workers.policies.chain import PolicyChain
from workers.policies.compose import ChainParts, build_chain

log = logging.getLogger(__name__)


class LimitFollower(TopicFollower[str, TenantLimitStatus]):
    """The latest TenantLimitStatus per tenant, read from the limits topic."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, settings.topics.limits, TenantLimitStatus, lambda s: s.tenant_id)

    def status(self, tenant_id: str) -> TenantLimitStatus | None:
        return self.latest.get(tenant_id)


class IntakePolicies:
    """The chain an intake process runs, and what feeds it."""

    def __init__(self, settings: Settings) -> None:
        self.follower = LimitFollower(settings) if settings.policy_limits else None
        self.chain: PolicyChain = build_chain(settings, ChainParts(limit_view=self.follower))

    async def start(self) -> None:
        if self.follower is not None:
            await self.follower.start()

    async def close(self) -> None:
        await self.chain.close()
        if self.follower is not None:
            await self.follower.close()
