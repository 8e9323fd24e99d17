"""The response cache: deterministic requests answered without the engine.

A request is deterministic when its temperature is 0: the same model, the same
assembled prompt (the conversation's memory included), the same ``max_tokens``
and the same stop sequences give the same answer. Its key is a SHA-256 of those
and the tenant (tenants never share entries). A request for log-probabilities is
neither answered from nor written to the cache: its entries keep none. An answer is reused for
``KONTEXT_CACHE_TTL_S`` after the engine gave it; a tenant with
``tenants.cache_opt_out`` is neither answered from nor written to the cache.
One Postgres round trip per micro-batch for the lookups (``before_engine``) and
one for the writes (``after_engine``, which also prunes some expired entries).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from uuid import UUID

import asyncpg

from kontext.metrics import CACHE_LOOKUPS
from schemas.events import EnrichedRequest, JobCompletion
from workers.completions import completion_for
from workers.engines.base import Generation
from workers.policies.base import Policy

PRUNE_PER_WRITE = 256
"""Expired entries deleted by each write statement (keeps the table bounded)."""

LOOKUP = """
SELECT i.job_id,
    EXISTS (SELECT 1 FROM tenants t WHERE t.id = i.tenant_id AND t.cache_opt_out) AS opted_out,
    c.output, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.mean_logprob
FROM unnest($1::uuid[], $2::text[], $3::text[]) AS i(job_id, tenant_id, key)
LEFT JOIN response_cache c
    ON c.key = i.key AND c.created_at > now() - make_interval(secs => $4::float8)
"""

WRITE = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::int[], $7::int[], $8::float8[])
        AS i(key, tenant_id, model, output, finish_reason, prompt_tokens,
             completion_tokens, mean_logprob)
), pruned AS (
    DELETE FROM response_cache WHERE key IN (
        SELECT key FROM response_cache
        WHERE created_at < now() - make_interval(secs => $9::float8) AND key <> ALL($1::text[])
        ORDER BY created_at LIMIT $10 FOR UPDATE SKIP LOCKED)
)
INSERT INTO response_cache AS c (key, tenant_id, model, output, finish_reason, prompt_tokens,
    completion_tokens, mean_logprob)
SELECT DISTINCT ON (key) key, tenant_id, model, output, finish_reason, prompt_tokens,
    completion_tokens, mean_logprob
FROM input i
WHERE NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = i.tenant_id AND t.cache_opt_out)
ON CONFLICT (key) DO UPDATE SET output = excluded.output,
    finish_reason = excluded.finish_reason, prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens, mean_logprob = excluded.mean_logprob,
    created_at = now()
"""


def entry_key(
    tenant_id: str, model: str, max_tokens: int, prompt: str, stop: Sequence[str] = ()
) -> str:
    """The cache key: hex SHA-256 of the tenant, model, max_tokens, assembled prompt and
    stop sequences (none: the key a request without them always had)."""
    digest = hashlib.sha256()
    parts = [tenant_id, model, str(max_tokens), prompt]
    if stop:
        parts.append(json.dumps(list(stop)))
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def cache_key(item: EnrichedRequest) -> str | None:
    """The entry ``item`` is answered from, or None when it is not deterministic."""
    request = item.request
    if request.temperature != 0 or request.logprobs:
        return None
    return entry_key(
        request.tenant_id, request.model, request.max_tokens, item.prompt, request.stop
    )


class ResponseCache(Policy):
    """Answers deterministic requests from earlier answers; stores new ones."""

    name = "cache"

    def __init__(self, pool: asyncpg.Pool, ttl_s: float) -> None:
        self.pool = pool
        self.ttl_s = ttl_s

    async def before_engine(self, items: Sequence[EnrichedRequest]) -> dict[UUID, JobCompletion]:
        keyed = {i.request.job_id: (i, k) for i in items if (k := cache_key(i)) is not None}
        if not keyed:
            return {}
        rows = await self.pool.fetch(
            LOOKUP,
            list(keyed),
            [item.request.tenant_id for item, _ in keyed.values()],
            [key for _, key in keyed.values()],
            self.ttl_s,
        )
        answered: dict[UUID, JobCompletion] = {}
        for row in rows:
            if row["opted_out"]:
                continue
            item, _ = keyed[row["job_id"]]
            model = item.request.model
            if row["output"] is None:
                CACHE_LOOKUPS.labels(model, "miss").inc()
                continue
            CACHE_LOOKUPS.labels(model, "hit").inc()
            generation = Generation(
                text=row["output"],
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                finish_reason="stop" if row["finish_reason"] == "stop" else "length",
                mean_logprob=row["mean_logprob"],
            )
            done = completion_for(item, generation)
            if done.context is not None:
                done = done.model_copy(
                    update={"context": done.context.model_copy(update={"cached": True})}
                )
            answered[item.request.job_id] = done
        return answered

    async def after_engine(
        self, done: Sequence[tuple[EnrichedRequest, JobCompletion]]
    ) -> set[UUID]:
        fresh = [
            (key, completion)
            for item, completion in done
            if completion.status == "succeeded"
            and completion.output is not None
            and completion.usage is not None
            and not (completion.context and completion.context.cached)
            and (key := cache_key(item)) is not None
        ]
        if fresh:
            await self.pool.execute(
                WRITE,
                [key for key, _ in fresh],
                [c.tenant_id for _, c in fresh],
                [c.model for _, c in fresh],
                [c.output for _, c in fresh],
                [c.finish_reason for _, c in fresh],
                [c.usage.prompt_tokens if c.usage else 0 for _, c in fresh],
                [c.usage.completion_tokens if c.usage else 0 for _, c in fresh],
                [c.mean_logprob for _, c in fresh],
                self.ttl_s,
                PRUNE_PER_WRITE,
            )
        return set()
