"""The recorder's statement on a real Postgres: each finalised job's turns go to its own
conversation, in order, the user turn with the embedding recall searched with; never
into a conversation another tenant owns, and the turns stored without an embedding
handed back for the recorder to embed. The recording that opens a conversation's
gate hands back the turn waiting behind it, and so does a duplicate of it. Each
outcome says the job's lane and kind (the memory upkeep stores a summary job's
answer as a summary)."""

from __future__ import annotations

import time
import uuid

import asyncpg
import numpy as np
from aiokafka import AIOKafkaProducer
from pgvector import Vector

from kontext.app.embedded import EmbeddedBroker
from kontext.settings import Settings
from kontext.store import enrichment, keys, ledger
from kontext.store.enrichment import Claim
from schemas.events import ContextInfo, EnrichedRequest, JobCompletion, JobRequest, TurnRecord
from tests.factories import job_request
from workers.completions import completion_for
from workers.embeddings import HashEmbedder
from workers.engines import load_tokenizer
from workers.engines.base import Generation
from workers.memory import MemoryKeeper
from workers.summaries import summary_job

DIMENSIONS = 384


def _answer(request: JobRequest, text: str) -> JobCompletion:
    """The completion inference publishes for ``request`` answered with ``text``."""
    question = TurnRecord(role="user", content=request.messages[-1].content, tokens=3)
    enriched = EnrichedRequest(
        request=request, prompt="", context=ContextInfo(prompt_tokens=5), new_turns=[question]
    )
    return completion_for(enriched, Generation(text, 5, 2, "stop"))


async def test_a_batch_stores_each_jobs_turns_in_its_own_conversation_and_no_other_tenants(
    pool: asyncpg.Pool,
) -> None:
    owner, other = f"ra-{uuid.uuid4().hex[:6]}", f"rb-{uuid.uuid4().hex[:6]}"
    await keys.create(pool, owner)
    await keys.create(pool, other)
    requests = [job_request(f"question {n}", tenant_id=owner) for n in range(3)]
    for request in requests:
        await ledger.admit(pool, request, None)
    kept, taken, plain = requests
    # The claim kept the first job's recall query; the second's conversation now
    # belongs to another tenant (forgotten and re-created under the same id).
    query = np.linspace(-1.0, 1.0, DIMENSIONS, dtype=np.float32)
    await pool.execute(
        "UPDATE jobs SET status = 'running', query_embedding = $2 WHERE id = $1",
        kept.job_id,
        Vector(query),
    )
    await pool.execute(
        "UPDATE conversations SET tenant_id = $2 WHERE id = $1", taken.conversation_id, other
    )

    async with pool.acquire() as conn:
        recorded = await ledger.record(
            conn, [_answer(r, f"answer {n}") for n, r in enumerate(requests)]
        )

    outcomes = {o.job_id: o for o in recorded.outcomes}
    assert set(outcomes) == {r.job_id for r in requests}
    assert all(o.fresh and o.status == "succeeded" for o in outcomes.values())
    assert outcomes[kept.job_id].result is not None
    answer = outcomes[kept.job_id].result
    assert answer is not None and answer.choices[0].message.content == "answer 0"
    turns = await pool.fetch(
        "SELECT conversation_id, seq, role, content, embedding FROM turns"
        " WHERE conversation_id = ANY($1::text[]) ORDER BY conversation_id, seq",
        [r.conversation_id for r in requests],
    )
    stored = {(t["conversation_id"], t["seq"]): t for t in turns}
    assert set(stored) == {
        (kept.conversation_id, 1), (kept.conversation_id, 2),
        (plain.conversation_id, 1), (plain.conversation_id, 2),
    }  # fmt: skip
    first, second = stored[(kept.conversation_id, 1)], stored[(kept.conversation_id, 2)]
    assert (first["role"], first["content"]) == ("user", "question 0")
    assert (second["role"], second["content"]) == ("assistant", "answer 0")
    assert np.allclose(first["embedding"].to_numpy(), query)
    assert second["embedding"] is None and stored[(plain.conversation_id, 1)]["embedding"] is None
    # Every turn stored without an embedding is handed back, to be embedded after replying.
    ids = await pool.fetch(
        "SELECT id, content FROM turns WHERE conversation_id = ANY($1::text[])"
        " AND embedding IS NULL",
        [kept.conversation_id, plain.conversation_id],
    )
    assert sorted(recorded.unembedded) == sorted((r["id"], r["content"]) for r in ids)
    assert sorted(content for _, content in recorded.unembedded) == [
        "answer 0", "answer 2", "question 2",
    ]  # fmt: skip
    embedding_kept = await pool.fetchval(
        "SELECT query_embedding FROM jobs WHERE id = $1", kept.job_id
    )
    assert embedding_kept is None  # stored with its turn, no longer on the job


async def test_the_recording_that_opens_a_gate_and_its_duplicates_hand_back_the_next_turn(
    pool: asyncpg.Pool,
) -> None:
    conversation = f"rc-{uuid.uuid4().hex[:6]}"
    first, second = (job_request(f"turn {n}", conversation_id=conversation) for n in range(2))
    for request in (first, second):
        await ledger.admit(pool, request, None)
    async with pool.acquire() as conn:
        found = await enrichment.enrich(
            conn, [Claim(first.job_id), Claim(second.job_id)], time.time(), None, 20, 4, 300.0
        )
    assert set(found.contexts) == {first.job_id}  # the second waits behind the first

    answer = _answer(first, "one")
    for attempt in ("recorded", "recorded again, its redrive message lost"):
        async with pool.acquire() as conn:
            recorded = await ledger.record(conn, [answer])
        assert [r.job_id for r in recorded.redrive] == [second.job_id], attempt
        [outcome] = recorded.outcomes
        assert outcome.fresh == (attempt == "recorded"), attempt
    in_flight = await pool.fetchval(
        "SELECT in_flight FROM conversations WHERE id = $1", conversation
    )
    assert in_flight == second.job_id


async def test_each_outcome_says_the_jobs_lane_and_kind_and_a_summary_its_range(
    pool: asyncpg.Pool,
) -> None:
    chat = job_request("an interactive turn")
    line = job_request("a backfill line", priority="background")
    summary = summary_job(chat.conversation_id, "tiny", 1, 1, 4, [("user", "hi")], 16)
    for request in (chat, line, summary):
        await ledger.admit(pool, request, None)
    answers = [_answer(chat, "one"), _answer(line, "two"), _answer(summary, "a summary")]
    for attempt in ("recorded", "recorded again"):
        async with pool.acquire() as conn:
            recorded = await ledger.record(conn, answers)
        outcomes = {o.job_id: o for o in recorded.outcomes}
        lanes = {job_id: (o.priority, o.kind, o.summary_of) for job_id, o in outcomes.items()}
        assert lanes == {
            chat.job_id: ("interactive", "chat", None),
            line.job_id: ("background", "chat", None),
            summary.job_id: ("background", "summary", {"level": 1, "first_seq": 1, "last_seq": 4}),
        }, attempt
        written = outcomes[summary.job_id].result
        assert written is not None and written.choices[0].message.content == "a summary"
    # A summary stores no turns: only the chat jobs' are handed back to be embedded.
    assert recorded.unembedded == []


async def test_a_batch_recorded_again_embeds_what_its_recorder_left_unembedded(
    pool: asyncpg.Pool, broker: EmbeddedBroker
) -> None:
    """A recorder that died after its recording, before its memory upkeep: the batch
    comes again, finds its jobs final, and its upkeep embeds their turns all the same."""
    settings = Settings(engines=["tiny"], summarizer="extractive")
    request = job_request("where did I park the car?")
    await ledger.admit(pool, request, None)
    answer = _answer(request, "on level three")
    async with pool.acquire() as conn:
        first = await ledger.record(conn, [answer])
    assert len(first.unembedded) == 2  # what the dead recorder's upkeep would have embedded

    embedder = HashEmbedder()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers)
    await producer.start()
    try:
        keeper = MemoryKeeper(settings, pool, producer, embedder, load_tokenizer("tiny", settings))
        async with pool.acquire() as conn:
            again = await ledger.record(conn, [answer])
        [outcome] = again.outcomes
        assert not outcome.fresh and again.unembedded == []
        await keeper.keep(again)
    finally:
        await producer.stop()
    rows = await pool.fetch(
        "SELECT content, embedding FROM turns WHERE conversation_id = $1 ORDER BY seq",
        request.conversation_id,
    )
    assert [r["content"] for r in rows] == ["where did I park the car?", "on level three"]
    expected = embedder.embed_sync([r["content"] for r in rows])
    for row, vector in zip(rows, expected, strict=True):
        assert np.allclose(row["embedding"].to_numpy(), vector, atol=1e-6)
