"""Policy steps: the gateway's middleware, one concern per module.

A policy overrides only the hooks it needs; every hook's default lets
everything through. Hooks take a whole micro-batch, so a step costs at most one
round trip per batch, never one per message (the two rewrite hooks are
synchronous, per item, and do no I/O).

- ``rewrite_request``: at intake (the API, batch lines), before a job is
  recorded or published; returns the request to use (e.g. PII redacted).
- ``check_submit``: at the API, before a job is recorded. A refusal becomes an
  HTTP error there (e.g. 429 with Retry-After).
- ``before_engine``: in the inference worker. Jobs answered here (e.g. from a
  cache) skip the engine.
- ``rewrite_completion``: in the inference worker, on each engine result before
  ``after_engine``; returns the completion to use.
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

    def rewrite_request(self, request: JobRequest) -> JobRequest:
        return request

    async def check_submit(self, request: JobRequest) -> Refusal | None:
        return None

    async def before_engine(self, items: Sequence[EnrichedRequest]) -> dict[UUID, JobCompletion]:
        return {}

    def rewrite_completion(self, completion: JobCompletion) -> JobCompletion:
        return completion

    async def after_engine(
        self, done: Sequence[tuple[EnrichedRequest, JobCompletion]]
    ) -> set[UUID]:
        return set()

    async def close(self) -> None:
        return None


class Refused(Exception):
    """A policy step refused a submission at the API (nothing was stored)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal
