"""The response cache, end to end: deterministic repeats skip the engine.

Proof that the engine was not called comes from the stack's own Prometheus
counters (``kontext_engine_requests_total`` does not move on a hit) and from
the result, which says ``context.cached``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from kontext.store import keys
from tests.conftest import Stack
from tests.scrape import Scrape, scrape
from workers.policies.cache import entry_key

MODEL = "tiny"
MAX_TOKENS = 8


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=90
    ) as client:
        yield client


async def _answer(
    http: httpx.AsyncClient,
    content: str,
    temperature: float = 0.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Submit a one-message job in a new conversation; its succeeded view."""
    response = await http.post(
        "/v1/jobs",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": MAX_TOKENS,
            "temperature": temperature,
            "include_prompt": True,
        },
        headers=headers,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    view = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60}, headers=headers)).json()
    assert view["status"] == "succeeded", view
    result: dict[str, Any] = view["result"]
    return result


def _engine(s: Scrape) -> float:
    return s.value("kontext_engine_requests_total", model=MODEL)


def _hits(s: Scrape) -> float:
    return s.value("kontext_cache_lookups_total", model=MODEL, result="hit")


def _misses(s: Scrape) -> float:
    return s.value("kontext_cache_lookups_total", model=MODEL, result="miss")


def _text(result: dict[str, Any]) -> str:
    text: str = result["choices"][0]["message"]["content"]
    return text


async def test_a_repeated_deterministic_request_is_answered_from_cache_without_the_engine(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    content = f"What is the capital of France? {uuid.uuid4().hex[:6]}"
    before = await scrape(stack)
    first = await _answer(http, content)
    between = await scrape(stack)
    second = await _answer(http, content)
    after = await scrape(stack)

    assert first["context"]["cached"] is False
    assert _engine(between) - _engine(before) == 1
    assert _misses(between) - _misses(before) == 1

    assert second["context"]["cached"] is True
    assert _text(second) == _text(first)
    assert second["usage"] == first["usage"]
    assert _engine(after) == _engine(between), "a cache hit must not call the engine"
    assert _hits(after) - _hits(between) == 1


async def test_a_sampled_request_is_never_cached(stack: Stack, http: httpx.AsyncClient) -> None:
    content = f"Tell me a story. {uuid.uuid4().hex[:6]}"
    before = await scrape(stack)
    first = await _answer(http, content, temperature=0.7)
    second = await _answer(http, content, temperature=0.7)
    after = await scrape(stack)
    assert first["context"]["cached"] is False
    assert second["context"]["cached"] is False
    assert _engine(after) - _engine(before) == 2
    assert _hits(after) == _hits(before) and _misses(after) == _misses(before)


async def test_an_entry_past_its_ttl_is_not_used(
    stack: Stack, http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    content = f"Name a colour. {uuid.uuid4().hex[:6]}"
    first = await _answer(http, content)
    key = entry_key("default", MODEL, MAX_TOKENS, first["context"]["prompt"])
    # Age the entry past the stack's TTL (KONTEXT_CACHE_TTL_S, default 3600 s).
    aged = await pool.execute(
        "UPDATE response_cache SET created_at = now() - interval '2 hours' WHERE key = $1", key
    )
    assert aged == "UPDATE 1"
    before = await scrape(stack)
    second = await _answer(http, content)
    after = await scrape(stack)
    assert second["context"]["cached"] is False
    assert _engine(after) - _engine(before) == 1
    # The fresh answer is the entry now, for another TTL.
    fresh = await pool.fetchval(
        "SELECT created_at > now() - interval '5 minutes' FROM response_cache WHERE key = $1", key
    )
    assert fresh is True
    third = await _answer(http, content)
    assert third["context"]["cached"] is True


async def test_an_opted_out_tenant_is_neither_answered_from_nor_written_to_the_cache(
    stack: Stack, http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    content = f"Private question {uuid.uuid4().hex[:6]}"
    # Another tenant asking the same thing never reads the default tenant's entry.
    await _answer(http, content)
    tenant = f"nocache-{uuid.uuid4().hex[:6]}"
    created = await keys.create(pool, tenant)
    headers = {"Authorization": f"Bearer {created.key}"}
    await pool.execute("UPDATE tenants SET cache_opt_out = true WHERE id = $1", tenant)

    before = await scrape(stack)
    first = await _answer(http, content, headers=headers)
    second = await _answer(http, content, headers=headers)
    after = await scrape(stack)
    assert first["context"]["cached"] is False
    assert second["context"]["cached"] is False
    assert _engine(after) - _engine(before) == 2
    stored = await pool.fetchval("SELECT count(*) FROM response_cache WHERE tenant_id = $1", tenant)
    assert stored == 0

    # Opting back in: answers are cached again.
    await pool.execute("UPDATE tenants SET cache_opt_out = false WHERE id = $1", tenant)
    await _answer(http, content, headers=headers)
    again = await _answer(http, content, headers=headers)
    assert again["context"]["cached"] is True
