"""The OpenAI Files and Batches APIs through the official ``openai`` package, against the
real stack (``tiny`` engine, one output token per request): upload, batch, follow,
download, cancel, list and page, delete; each tenant sees only its own files."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.store import keys
from tests.conftest import Stack, stack_env, start_stack
from tests.factories import batch_line, jsonl

ENDED = ("completed", "failed", "expired", "cancelled")
SMALL_LIMIT = 4096
"""KONTEXT_FILES_MAX_BYTES of the API process the size test runs against."""


def _client(url: str, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with _client(stack.api_url, stack.api_key) as client:
        yield client


async def _tenant_client(stack: Stack, pool: asyncpg.Pool) -> AsyncOpenAI:
    """A client with the key of a new tenant (nothing of other tests in its lists)."""
    created = await keys.create(pool, f"oa-{uuid.uuid4().hex[:10]}")
    return _client(stack.api_url, created.key)


async def _batch(client: AsyncOpenAI, text: str, **extra: Any) -> Batch:
    content = text.encode()
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(content)
    return await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **extra,
    )


async def _until_ended(client: AsyncOpenAI, batch_id: str, timeout: float = 120) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        await asyncio.sleep(0.2)


async def _lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [orjson.loads(raw) for raw in content.content.splitlines() if raw.strip()]


async def test_a_batch_runs_from_an_uploaded_file_to_its_output_file(
    client: AsyncOpenAI,
) -> None:
    ids = [f"ok-{i}" for i in range(20)]
    content = jsonl([batch_line(c, f"Tell me about {c}.") for c in ids])
    created = await _batch(client, content, metadata={"job": "nightly"})
    assert created.object == "batch" and created.endpoint == "/v1/chat/completions"
    assert created.completion_window == "24h" and created.metadata == {"job": "nightly"}
    assert created.input_file_id.startswith("file-")
    assert isinstance(created.created_at, int) and created.expires_at is not None
    assert created.expires_at - created.created_at == 24 * 3600
    assert created.output_file_id is None and created.error_file_id is None

    done = await _until_ended(client, created.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (20, 20)
    assert done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.errors is None and done.error_file_id is None

    output = await _lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(ids)
    for line in output:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        assert body["choices"][0]["message"]["role"] == "assistant"

    assert done.output_file_id is not None
    stored = await client.files.retrieve(done.output_file_id)
    assert stored.purpose == "batch_output" and stored.status == "processed"
    raw = await client.files.content(done.output_file_id)
    assert stored.bytes == len(raw.content)
    listed = [f.id async for f in client.files.list(purpose="batch_output")]
    assert done.output_file_id in listed


async def test_bad_lines_are_listed_in_errors_and_in_the_error_file(
    client: AsyncOpenAI,
) -> None:
    content = jsonl(
        [
            batch_line("good-1"),
            "{not json",
            {**batch_line("wrong-url"), "url": "/v1/embeddings"},
            batch_line("good-2"),
            batch_line("unknown-model", model="gpt-4o"),
        ]
    )
    created = await _batch(client, content)
    assert created.errors is not None and created.errors.object == "list"
    reported = {(e.line, e.code) for e in created.errors.data or []}
    assert reported == {(2, "invalid_json"), (3, "invalid_url"), (5, "unknown_model")}
    assert all(e.message for e in created.errors.data or [])

    done = await _until_ended(client, created.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 2)
    assert done.request_counts.failed == 3
    output = await _lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["good-1", "good-2"]
    errors = await _lines(client, done.error_file_id)
    assert {(e["error"]["line"], e["error"]["code"]) for e in errors} == reported
    assert all(e["response"] is None for e in errors)
    assert {e["custom_id"] for e in errors} == {None, "wrong-url", "unknown-model"}

    # A batch whose every line is bad fails at once, with only an error file.
    failed = await _batch(client, jsonl(["[]", batch_line("x", model="nope")]))
    assert failed.status == "failed" and failed.failed_at
    assert failed.output_file_id is None
    assert len(await _lines(client, failed.error_file_id)) == 2


async def test_cancel_stops_a_batch_and_every_line_lands_in_a_file(client: AsyncOpenAI) -> None:
    ids = [f"c-{i}" for i in range(1500)]
    created = await _batch(client, jsonl([batch_line(c) for c in ids]))
    cancelled = await client.batches.cancel(created.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    done = await _until_ended(client, created.id)
    assert done.status == "cancelled" and done.cancelled_at and done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.failed > 0 and counts.completed + counts.failed == len(ids)

    output = await _lines(client, done.output_file_id) if counts.completed else []
    errors = await _lines(client, done.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert sorted(line["custom_id"] for line in output + errors) == sorted(ids)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}

    # Cancelling again is harmless; a batch that completed cannot be cancelled.
    assert (await client.batches.cancel(created.id)).status == "cancelled"
    finished = await _until_ended(client, (await _batch(client, jsonl([batch_line("x")]))).id)
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(finished.id)
    with pytest.raises(openai.NotFoundError):
        await client.batches.cancel(str(uuid.uuid4()))


async def test_batches_are_listed_newest_first_page_by_page(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    async with await _tenant_client(stack, pool) as client:
        made = [(await _batch(client, jsonl([batch_line(f"p-{i}")]))).id for i in range(3)]
        first = await client.batches.list(limit=2)
        assert [b.id for b in first.data] == made[:0:-1]
        assert first.has_more
        second = await client.batches.list(limit=2, after=first.data[-1].id)
        assert [b.id for b in second.data] == made[:1] and not second.has_more
        # The SDK's own paging walks every page.
        assert [b.id async for b in client.batches.list(limit=1)] == made[::-1]


async def test_a_header_key_and_a_body_key_must_agree_and_a_stray_cursor_ends_the_list(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    async with await _tenant_client(stack, pool) as client:
        uploaded = await client.files.create(
            file=("input.jsonl", jsonl([batch_line("k")]).encode()), purpose="batch"
        )

        async def create(**extra: Any) -> Batch:
            return await client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                **extra,
            )

        key = f"agree-{uuid.uuid4().hex}"
        with pytest.raises(openai.BadRequestError) as refused:
            await create(
                extra_headers={"Idempotency-Key": key},
                extra_body={"idempotency_key": f"{key}-other"},
            )
        assert refused.value.code == "idempotency_key_conflict"
        assert [b.id async for b in client.batches.list()] == []
        made = await create(
            extra_headers={"Idempotency-Key": key}, extra_body={"idempotency_key": key}
        )
        assert (await create(extra_body={"idempotency_key": key})).id == made.id

        for stray in ("garbage", str(uuid.uuid4())):
            page = await client.batches.list(after=stray)
            assert page.data == [] and not page.has_more
            assert [f.id async for f in client.files.list(after=stray)] == []


async def test_files_are_listed_retrieved_and_deleted(stack: Stack, pool: asyncpg.Pool) -> None:
    async with await _tenant_client(stack, pool) as client:
        contents = [jsonl([batch_line(f"f-{i}")]).encode() for i in range(3)]
        made = [
            await client.files.create(file=(f"in-{i}.jsonl", c), purpose="batch")
            for i, c in enumerate(contents)
        ]
        assert [f.filename for f in made] == ["in-0.jsonl", "in-1.jsonl", "in-2.jsonl"]
        assert all(f.object == "file" and f.status == "processed" for f in made)
        page = await client.files.list(limit=2)
        assert [f.id for f in page.data] == [made[2].id, made[1].id] and page.has_more
        assert [f.id async for f in client.files.list(limit=2)] == [f.id for f in made[::-1]]
        oldest = await client.files.list(order="asc", limit=1)
        assert [f.id for f in oldest.data] == [made[0].id]
        assert [f.id async for f in client.files.list(purpose="batch_output")] == []

        found = await client.files.retrieve(made[1].id)
        assert found.model_dump() == made[1].model_dump()
        assert (await client.files.content(made[1].id)).content == contents[1]

        deleted = await client.files.delete(made[1].id)
        assert deleted.id == made[1].id and deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(made[1].id)
        with pytest.raises(openai.NotFoundError):
            await client.files.delete(made[1].id)
        assert [f.id async for f in client.files.list()] == [made[2].id, made[0].id]
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve("file-not-a-file")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(file=("x.jsonl", contents[0]), purpose="fine-tune")
        assert refused.value.code == "invalid_purpose"


async def test_another_tenant_sees_none_of_a_tenants_files_or_batches(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    async with (
        await _tenant_client(stack, pool) as mine,
        await _tenant_client(stack, pool) as theirs,
    ):
        batch = await _batch(mine, jsonl([batch_line("mine")]))
        file_id = batch.input_file_id
        with pytest.raises(openai.NotFoundError):
            await theirs.files.retrieve(file_id)
        with pytest.raises(openai.NotFoundError):
            await theirs.files.content(file_id)
        with pytest.raises(openai.NotFoundError):
            await theirs.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await theirs.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        with pytest.raises(openai.NotFoundError):
            await theirs.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await theirs.batches.cancel(batch.id)
        assert [f.id async for f in theirs.files.list()] == []
        assert [b.id async for b in theirs.batches.list()] == []
        # Still there for its owner.
        assert (await mine.files.retrieve(file_id)).id == file_id
        done = await _until_ended(mine, batch.id)
        assert done.status == "completed"


@pytest.fixture(scope="module")
def small_api(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path, stack: Stack
) -> Iterator[Stack]:
    """An API process of the session stack's deployment taking files of at most
    ``SMALL_LIMIT`` bytes."""
    env = stack_env(broker, database, prefix=stack.settings.topic_prefix)
    env["KONTEXT_FILES_MAX_BYTES"] = str(SMALL_LIMIT)
    api = start_stack(["worker", "api", "--port", "0"], env, workdir)
    yield api
    assert api.stop() == 0, "".join(api.output[-40:])


async def test_a_file_over_the_size_limit_is_refused_with_413(
    small_api: Stack, stack: Stack
) -> None:
    async with _client(small_api.api_url, stack.api_key) as client:
        fits = await client.files.create(file=("fits.jsonl", b"x" * SMALL_LIMIT), purpose="batch")
        assert fits.bytes == SMALL_LIMIT
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.create(file=("big.jsonl", b"x" * (SMALL_LIMIT + 1)), purpose="batch")
        assert refused.value.status_code == 413
        assert refused.value.code == "file_too_large"
        assert str(SMALL_LIMIT) in refused.value.message
        # Far over it: refused before the body is read.
        with pytest.raises(openai.APIStatusError) as refused:
            await client.files.create(file=("huge.jsonl", b"x" * (4 << 20)), purpose="batch")
        assert refused.value.status_code == 413
        # Nothing was stored.
        names = [f.filename async for f in client.files.list()]
        assert "big.jsonl" not in names and "huge.jsonl" not in names
