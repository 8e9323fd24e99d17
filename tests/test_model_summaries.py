"""With KONTEXT_SUMMARIZER=model, summaries are jobs the model writes through the
pipeline, in the background lane, and their answers become stored summaries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from producers.client import KontextClient
from tests.conftest import Stack, stack_env, start_stack, wait_for


@pytest.fixture(scope="module")
def model_stack(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Stack]:
    env = stack_env(broker, database, prefix=f"m{uuid.uuid4().hex[:8]}")
    env.update(KONTEXT_SUMMARIZER="model", KONTEXT_SUMMARY_KEEP_RECENT="2")
    stack = start_stack(["up", "--engine", "tiny", "--port", "0"], env, workdir)
    yield stack
    assert stack.stop() == 0


async def test_the_model_writes_summaries_as_background_jobs(
    model_stack: Stack, pool: asyncpg.Pool
) -> None:
    settings = model_stack.settings
    conversation = f"summ-{uuid.uuid4().hex[:8]}"
    async with KontextClient(
        model_stack.api_url, settings.bootstrap, topics=settings.topics, api_key=model_stack.api_key
    ) as client:
        for turn in range(8):
            reply = await client.chat(
                model="tiny",
                conversation_id=conversation,
                messages=[
                    {"role": "user", "content": f"Turn {turn}: my favourite number is {turn * 7}."}
                ],
                max_tokens=24,
                timeout=60,
            )
            assert reply.status == "succeeded"

    async def summarised() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM summaries WHERE conversation_id = $1", conversation
            )
        )

    await wait_for(summarised, timeout=60)
    job = await pool.fetchrow(
        """
        SELECT kind, status, request, result FROM jobs
        WHERE conversation_id = $1 AND kind = 'summary' ORDER BY created_at LIMIT 1
        """,
        conversation,
    )
    assert job is not None
    assert job["status"] == "succeeded"
    assert job["request"]["priority"] == "background"
    assert "Summarise" in job["request"]["messages"][0]["content"]
    summary = await pool.fetchrow(
        "SELECT level, first_seq, last_seq, content FROM summaries WHERE conversation_id = $1 "
        "ORDER BY first_seq LIMIT 1",
        conversation,
    )
    assert summary is not None
    assert summary["level"] == 1 and summary["first_seq"] == 1
    spec = job["request"]["metadata"]["summary"]
    assert (summary["first_seq"], summary["last_seq"]) == (spec["first_seq"], spec["last_seq"])
    assert summary["content"] == job["result"]["choices"][0]["message"]["content"].strip()
    # A summary job stores no turns of its own in the conversation.
    roles = await pool.fetch(
        "SELECT count(*) AS n FROM turns WHERE conversation_id = $1", conversation
    )
    assert roles[0]["n"] == 16
