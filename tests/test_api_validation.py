"""Bad input gets a clear 4xx and stores nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import orjson
import pytest

from tests.conftest import Stack

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}

CASES: list[tuple[str, Any, int, str, str]] = [
    # (name, body (str = raw), status, error code, text in message)
    ("malformed json", '{"model": "tiny", "messages": [', 400, "malformed_json", "not valid JSON"),
    ("missing messages", {"model": "tiny"}, 422, "invalid_request", "messages"),
    ("empty messages", {"model": "tiny", "messages": []}, 422, "invalid_request", "messages"),
    (
        "empty content",
        {"model": "tiny", "messages": [{"role": "user", "content": "  "}]},
        422,
        "invalid_request",
        "must not be empty",
    ),
    (
        "last message not from user",
        {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]},
        422,
        "invalid_request",
        "role 'user'",
    ),
    (
        "unknown role",
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        422,
        "invalid_request",
        "messages.0.role",
    ),
    (
        "messages wrong type",
        {"model": "tiny", "messages": "hi"},
        422,
        "invalid_request",
        "messages",
    ),
    ("max_tokens wrong type", {**GOOD, "max_tokens": "many"}, 422, "invalid_request", "max_tokens"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 422, "invalid_request", "max_tokens"),
    (
        "max_tokens too large",
        {**GOOD, "max_tokens": 100_000},
        422,
        "max_tokens_out_of_range",
        "between 1 and",
    ),
    (
        "max_tokens beyond the model's window",
        {**GOOD, "model": "tiny", "max_tokens": 1000},
        422,
        "max_tokens_out_of_range",
        "1024-token context window of model tiny: at most 952",
    ),
    (
        "too many messages",
        {**GOOD, "messages": [{"role": "user", "content": "hi"}] * 257},
        422,
        "too_many_messages",
        "at most 256 messages a request, got 257",
    ),
    ("temperature out of range", {**GOOD, "temperature": 9}, 422, "invalid_request", "temperature"),
    ("unknown field", {**GOOD, "stream_me": True}, 422, "invalid_request", "stream_me"),
    (
        "bad conversation id",
        {**GOOD, "conversation_id": "../x"},
        422,
        "invalid_request",
        "conversation_id",
    ),
    ("unknown model", {**GOOD, "model": "gpt-9"}, 400, "unknown_model", "tiny"),
    ("body not an object", "[1, 2]", 422, "invalid_request", "body"),
    # Found by the API fuzzer: values the ledger (Postgres jsonb) cannot hold were 500s.
    (
        "NUL character",
        '{"model": "tiny", "messages": [{"role": "user", "content": "a\\u0000b"}]}',
        422,
        "invalid_request",
        "NUL",
    ),
    (
        "lone surrogate",
        '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
        422,
        "invalid_request",
        "surrogate",
    ),
    (
        "integer beyond 64 bits",
        {**GOOD, "metadata": {"n": [1, 2**70]}},
        422,
        "invalid_request",
        "metadata.n[1]",
    ),
]


async def _counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM turns) AS turns"
    )
    assert row is not None
    return row["jobs"], row["turns"]


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "text"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_submission_is_refused_and_nothing_is_stored(
    stack: Stack, pool: asyncpg.Pool, name: str, body: Any, status: int, code: str, text: str
) -> None:
    before = await _counts(pool)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        if isinstance(body, str):
            response = await http.post(
                "/v1/jobs", content=body, headers={"content-type": "application/json"}
            )
        else:
            response = await http.post("/v1/jobs", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert text in error["message"] or text in str(error.get("details"))
    assert "Traceback" not in response.text
    if code == "unknown_model":
        assert set(error["served_models"]) == {"tiny", "smollm2"}
    assert await _counts(pool) == before


async def test_body_over_the_size_limit_is_refused(stack: Stack, pool: asyncpg.Pool) -> None:
    before = await _counts(pool)
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "a" * 2_000_000}]}
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        response = await http.post("/v1/jobs", json=huge)

        async def chunks():  # no Content-Length: the limit applies while streaming
            for _ in range(30):
                yield b"a" * 100_000

        streamed = await http.post(
            "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert streamed.status_code == 413
    assert await _counts(pool) == before


async def test_unknown_job_is_404(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        response = await http.get("/v1/jobs/00000000-0000-0000-0000-000000000000")
        malformed = await http.get("/v1/jobs/not-a-uuid")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert malformed.status_code == 422


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", None]
)
async def test_a_good_submission_is_accepted_whatever_json_content_type_it_names(
    stack: Stack, pool: asyncpg.Pool, content_type: str | None
) -> None:
    """A body without a content type is read as JSON too (as FastAPI reads one); a
    body sent in chunks (no Content-Length) is accepted like one sent whole; the same
    idempotency key again answers 200 with the same job."""
    body = orjson.dumps({**GOOD, "idempotency_key": f"ct-{content_type}"})
    headers = {"content-type": content_type} if content_type else {}

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        if content_type is None:  # httpx names none for raw content
            first = await http.post("/v1/jobs", content=body)
        else:
            first = await http.post("/v1/jobs", content=chunks(), headers=headers)
        again = await http.post("/v1/jobs", content=body, headers=headers)
    assert first.status_code == 202, first.text
    job = first.json()
    assert first.headers["location"] == f"/v1/jobs/{job['id']}"
    assert first.headers["content-type"] == "application/json"
    assert job["status"] == "queued"
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE id = $1", UUID(job["id"])) == 1


async def test_a_body_that_is_not_json_by_its_content_type_is_refused(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        response = await http.post(
            "/v1/jobs", content=orjson.dumps(GOOD), headers={"content-type": "text/plain"}
        )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
