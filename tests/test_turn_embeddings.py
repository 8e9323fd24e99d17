"""A user's message is embedded once: the enricher's recall query embedding is
stored with the turn, so the memory worker only embeds what came without one.

The pipeline runs in this process without the memory worker, so whatever
embedding a stored turn has, the enricher computed it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.app.runtime import Runtime, run_while
from kontext.settings import Settings
from kontext.store import keys, memory
from producers.client import KontextClient

WITHOUT_MEMORY_WORKER = ["api", "enricher", "inference", "recorder"]


async def test_a_user_message_is_stored_with_the_embedding_recall_searched_with(
    broker: EmbeddedBroker,
    database: EmbeddedPostgres,
    workdir: Path,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(workdir)  # the stream processors' state directories go there
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        database_url=database.url,
        topic_prefix=f"emb{uuid.uuid4().hex[:8]}",
        topic_partitions=1,
        engines=["tiny"],
        policy_limits=False,
        api_port=0,
        kafka_session_timeout_ms=3000,
    )
    key = (await keys.create(pool, "default")).key
    conversation = f"embedded-{uuid.uuid4().hex[:8]}"
    text = "My sister's cat is called Pickle and she hates thunderstorms."

    async def chat(runtime: Runtime, url: str) -> np.ndarray:
        async with KontextClient(
            url, settings.bootstrap, topics=settings.topics, api_key=key
        ) as client:
            reply = await client.chat(
                model="tiny",
                conversation_id=conversation,
                messages=[
                    {"role": "user", "content": "Hello there."},
                    {"role": "assistant", "content": "Hi! How can I help?"},
                    {"role": "user", "content": text},
                ],
                max_tokens=8,
                timeout=60,
            )
        assert reply.status == "succeeded"
        embedder = await runtime.embedder()
        return (await embedder.embed([text]))[0]

    run = run_while(settings, chat, asyncio.Event(), WITHOUT_MEMORY_WORKER)
    expected = await asyncio.wait_for(run, timeout=180)

    rows = await pool.fetch(
        "SELECT role, content, embedding FROM turns WHERE conversation_id = $1 ORDER BY seq",
        conversation,
    )
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    # The message recall searched with is stored embedded, with that very embedding.
    assert rows[2]["content"] == text and rows[2]["embedding"] is not None
    assert np.allclose(rows[2]["embedding"].to_numpy(), expected, atol=1e-5)
    # The rest is left to the memory worker (not running here): it embeds only these.
    assert [r["embedding"] for r in (rows[0], rows[1], rows[3])] == [None, None, None]
    async with pool.acquire() as conn:
        pending = await memory.unembedded_turns(conn, [conversation], 10)
    assert [content for _, content in pending] == [
        rows[0]["content"],
        rows[1]["content"],
        rows[3]["content"],
    ]
