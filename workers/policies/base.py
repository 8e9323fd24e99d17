"""Policy steps: the gateway's middleware, one concern per module.

A policy overrides only the hooks it needs; every hook's default lets
everything through. Hooks take a whole micro-batch, so a step costs at most one
round trip per batch, never one per message.

- ``check_submit``: at the API, before a job is recorded. A refusal becomes an
  HTTP error there (e.g. 429 with Retry-After).
- ``admit``: in the admission stage, before enrichment. A refused job fails
  with the refusal's code and message.
- ``before_engine``: in the inference worker. Jobs answered here (e.g. from a
  cache) skip the engine.
- ``after_engine``: in the inference worker, after the engine. Jobs it holds
  (e.g. for human review) are not published until released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from schemas.events import EnrichedRequest, JobCompletion, JobRequest


@dataclass(frozen=True)
class Refusal:
    """Why a policy refused a job. ``status`` is the HTTP status at the API."""

    code: str
    message: str
    status: int = 429
    retry_after_s: float | None = None


class Policy:
    """Base class of every policy step: all hooks pass everything through."""

    name = "policy"

    async def check_submit(self, request: JobRequest) -> Refusal | None:
        return None

    async def admit(self, requests: Sequence[JobRequest]) -> dict[UUID, Refusal]:
        return {}

    async def before_engine(self, items: Sequence[EnrichedRequest]) -> dict[UUID, JobCompletion]:
        return {}

    async def after_engine(
        self, done: Sequence[tuple[EnrichedRequest, JobCompletion]]
    ) -> set[UUID]:
        return set()

    async def close(self) -> None:
        return None
