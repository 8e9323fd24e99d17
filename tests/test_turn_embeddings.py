"""A user's message is embedded once: the enricher's recall query embedding is
stored with the turn, and the recorder, once it has replied, embeds the rest (its
recording hands back only the turns stored without one: tests/test_record.py)."""

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
from kontext.store import keys
from producers.client import KontextClient
from tests.conftest import wait_for

PIPELINE = ["api", "enricher", "inference", "recorder"]


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
        # float32 embeds a text alike in any batch; bfloat16 (the default on a CPU with
        # AMX) to within about 1e-3, as a batch's shape moves its rounding.
        torch_dtype="float32",
        policy_limits=False,
        api_port=0,
        kafka_session_timeout_ms=3000,
    )
    key = (await keys.create(pool, "default")).key
    conversation = f"embedded-{uuid.uuid4().hex[:8]}"
    text = "My sister's cat is called Pickle and she hates thunderstorms."

    async def chat(runtime: Runtime, url: str) -> dict[str, np.ndarray]:
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
        # The recorder embeds the rest after replying, before it commits the batch.
        await wait_for(
            lambda: pool.fetchval(
                "SELECT count(*) = 4 AND bool_and(embedding IS NOT NULL) FROM turns"
                " WHERE conversation_id = $1",
                conversation,
            ),
            timeout=30,
        )
        embedder = await runtime.embedder()
        contents = [
            m["content"]
            for m in await pool.fetch(
                "SELECT content FROM turns WHERE conversation_id = $1", conversation
            )
        ]
        return dict(zip(contents, await embedder.embed(contents), strict=True))

    run = run_while(settings, chat, asyncio.Event(), PIPELINE)
    expected = await asyncio.wait_for(run, timeout=180)

    rows = await pool.fetch(
        "SELECT role, content, embedding FROM turns WHERE conversation_id = $1 ORDER BY seq",
        conversation,
    )
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    # Every turn is stored with its own text's embedding: the message recall searched
    # with, with the very embedding it searched with.
    assert rows[2]["content"] == text
    for row in rows:
        assert np.allclose(row["embedding"].to_numpy(), expected[row["content"]], atol=1e-5)
