"""Human review: hold a result when the model was unsure or the turn matches a pattern.

A chat result is held when the engine's mean token log-probability is under
``KONTEXT_REVIEW_LOGPROB_THRESHOLD``, or when one of ``KONTEXT_REVIEW_PATTERNS``
matches the request's new messages or the answer. A held job turns
``needs_review`` and its completion is kept in ``reviews`` instead of being
published: it is not recorded, replied to nor delivered until a reviewer
approves or replaces it (``POST /v1/jobs/{id}/review``, kontext/reviews.py),
which publishes it to the completions topic for the recorder. One Postgres
round trip per micro-batch (none when review is not configured); it also keeps
held every job that already has a review, so a redelivered batch cannot slip a
new answer past its reviewer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from uuid import UUID

import asyncpg
import orjson

from kontext.metrics import REVIEW_HELD
from schemas.events import EnrichedRequest, JobCompletion
from workers.policies.base import Policy

HOLD = """
WITH input AS (
    -- Lists travel as JSON text: asyncpg would read a list of lists as a 2-D array.
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::float8[],
        $6::text[]) AS i(job_id, request, original_output, completion, mean_logprob, reasons)
), held AS (
    INSERT INTO reviews (job_id, tenant_id, conversation_id, model, reasons, mean_logprob,
        request, original_output, completion)
    SELECT i.job_id, j.tenant_id, j.conversation_id, j.model,
        ARRAY(SELECT jsonb_array_elements_text(i.reasons::jsonb)), i.mean_logprob,
        i.request::jsonb, i.original_output, i.completion
    FROM input i JOIN jobs j ON j.id = i.job_id AND j.status IN ('queued', 'running')
    WHERE i.reasons IS NOT NULL
    ON CONFLICT (job_id) DO NOTHING
    RETURNING job_id
), marked AS (
    -- Its timeline shows the stages it went through (the recorder stamps the rest).
    UPDATE jobs SET status = 'needs_review', updated_at = now(),
        enriched_at = (i.completion->>'enriched_at')::timestamptz,
        batched_at = (i.completion->>'batched_at')::timestamptz,
        generated_at = (i.completion->>'generated_at')::timestamptz
    FROM held JOIN input i ON i.job_id = held.job_id WHERE jobs.id = held.job_id
)
SELECT job_id FROM held
UNION
-- Already held (this is a redelivered batch): its review decides, not this run.
SELECT r.job_id FROM reviews r JOIN input i ON i.job_id = r.job_id
"""


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


class HumanReview(Policy):
    """Holds uncertain or flagged chat results for a reviewer's decision."""

    name = "review"

    def __init__(
        self, pool: asyncpg.Pool, threshold: float | None, patterns: Sequence[str]
    ) -> None:
        self.pool = pool
        self.threshold = threshold
        self.patterns = [re.compile(p) for p in patterns]

    def reasons(self, item: EnrichedRequest, done: JobCompletion) -> list[str]:
        """Why this result needs a reviewer (empty: it does not)."""
        if done.status != "succeeded" or item.request.kind != "chat" or done.output is None:
            return []
        found: list[str] = []
        logprob = done.mean_logprob
        if self.threshold is not None and logprob is not None and logprob < self.threshold:
            found.append(f"logprob: {logprob:.3f} < {self.threshold}")
        asked = "\n".join(m.content for m in item.request.messages)
        for pattern in self.patterns:
            if pattern.search(asked):
                found.append(f"request_pattern: {pattern.pattern}")
            if pattern.search(done.output):
                found.append(f"answer_pattern: {pattern.pattern}")
        return found

    async def after_engine(
        self, done: Sequence[tuple[EnrichedRequest, JobCompletion]]
    ) -> set[UUID]:
        """Hold what needs a reviewer, and every job already held (one statement)."""
        if self.threshold is None and not self.patterns:
            return set()
        reasons = {c.job_id: why for item, c in done if (why := self.reasons(item, c))}
        rows = await self.pool.fetch(
            HOLD,
            [c.job_id for _, c in done],
            [
                _json([m.model_dump(mode="json") for m in i.request.messages])
                if c.job_id in reasons
                else None
                for i, c in done
            ],
            [c.output if c.job_id in reasons else None for _, c in done],
            [c.model_dump(mode="json") if c.job_id in reasons else None for _, c in done],
            [c.mean_logprob for _, c in done],
            [_json(reasons[c.job_id]) if c.job_id in reasons else None for _, c in done],
        )
        held = {row["job_id"] for row in rows}
        for item, c in done:
            if c.job_id in held:
                for reason in {w.split(":", 1)[0] for w in reasons.get(c.job_id, [])}:
                    REVIEW_HELD.labels(item.request.model, reason).inc()
        return held
