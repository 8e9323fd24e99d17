"""Conversation memory end to end: recall, summaries, turn order, forgetting.

The session stack runs with a 512-token prompt budget and the extractive
summariser with low thresholds (see conftest.stack_env).
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx

from producers.client import KontextClient
from tests.conftest import Stack, wait_for

FILLER = [
    "I spent the morning walking along the river with a friend.",
    "We talked about which films are worth seeing this season.",
    "The weather turned grey, so we went looking for a quiet cafe.",
    "They recommended a book about mountain villages and old roads.",
    "Later we argued gently about the best way to cook rice.",
    "In the evening I tidied the kitchen and listened to some jazz.",
]


async def test_a_fact_from_turn_1_reaches_the_prompt_of_turn_40(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    conversation = f"recall-{uuid.uuid4().hex[:8]}"
    first = await client.chat(
        model="tiny",
        conversation_id=conversation,
        messages=[{"role": "user", "content": "Remember this: my locker code is 4417."}],
        max_tokens=16,
        timeout=60,
    )
    assert first.status == "succeeded"
    for turn in range(2, 40):
        reply = await client.chat(
            model="tiny",
            conversation_id=conversation,
            messages=[{"role": "user", "content": FILLER[turn % len(FILLER)]}],
            max_tokens=16,
            timeout=60,
        )
        assert reply.status == "succeeded"
    last = await client.chat(
        model="tiny",
        conversation_id=conversation,
        messages=[{"role": "user", "content": "What is my locker code?"}],
        max_tokens=16,
        include_prompt=True,
        timeout=60,
    )
    assert last.status == "succeeded" and last.result is not None
    context = last.result.context
    assert context is not None and context.prompt is not None
    assert context.budget_tokens == 512
    assert context.prompt_tokens <= 512
    assert "4417" in context.prompt
    assert context.prompt.endswith("What is my locker code?\n<|assistant|>\n")
    # Turn 1 is far outside the recent turns: it came back through a summary or recall.
    assert 1 not in context.turns
    assert context.summaries or any(m.seq == 1 for m in context.memories)

    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        view = (await http.get(f"/v1/conversations/{conversation}")).json()
    assert len(view["turns"]) == 80
    levels = {s["level"] for s in view["summaries"]}
    assert 1 in levels and 2 in levels, view["summaries"]  # hierarchical roll-up
    rolled = [s for s in view["summaries"] if s["level"] == 1 and s["rolled_up"]]
    assert rolled


async def test_turns_submitted_at_once_are_answered_in_order(
    stack: Stack, client: KontextClient
) -> None:
    conversation = f"order-{uuid.uuid4().hex[:8]}"
    texts = [f"message number {i} of five" for i in range(5)]
    jobs = []
    for text in texts:  # submitted back to back, none waiting for the previous answer
        jobs.append(
            await client.submit(
                model="tiny",
                conversation_id=conversation,
                messages=[{"role": "user", "content": text}],
                max_tokens=8,
            )
        )
    replies = await asyncio.gather(*(client.result(job.id, timeout=90) for job in jobs))
    assert all(r.status == "succeeded" for r in replies)
    # Each turn's prompt held every earlier exchange: it ran after they were recorded.
    for position, reply in enumerate(replies):
        assert reply.result is not None and reply.result.context is not None
        assert reply.result.context.turns == list(range(1, 2 * position + 1))
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        view = (await http.get(f"/v1/conversations/{conversation}")).json()
    users = [t["content"] for t in view["turns"] if t["role"] == "user"]
    assert users == texts
    assert [t["role"] for t in view["turns"]] == ["user", "assistant"] * 5


async def test_deleting_a_conversation_forgets_it(
    stack: Stack, client: KontextClient, pool: asyncpg.Pool
) -> None:
    conversation = f"forget-{uuid.uuid4().hex[:8]}"
    reply = await client.chat(
        model="tiny",
        conversation_id=conversation,
        messages=[{"role": "user", "content": "My passport number is X1234567."}],
        max_tokens=8,
        timeout=60,
    )
    assert reply.status == "succeeded"

    async def embedded() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT bool_and(embedding IS NOT NULL) FROM turns WHERE conversation_id = $1",
                conversation,
            )
        )

    await wait_for(embedded, timeout=30)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=stack.headers) as http:
        assert (await http.get(f"/v1/conversations/{conversation}")).status_code == 200
        deleted = await http.delete(f"/v1/conversations/{conversation}")
        assert deleted.status_code == 204
        assert (await http.get(f"/v1/conversations/{conversation}")).status_code == 404
        assert (await http.get(f"/v1/jobs/{reply.job_id}")).status_code == 404
        assert (await http.delete(f"/v1/conversations/{conversation}")).status_code == 404
    counts = await pool.fetchrow(
        """
        SELECT (SELECT count(*) FROM turns WHERE conversation_id = $1) AS turns,
               (SELECT count(*) FROM summaries WHERE conversation_id = $1) AS summaries,
               (SELECT count(*) FROM jobs WHERE conversation_id = $1) AS jobs,
               (SELECT count(*) FROM turns WHERE content LIKE '%X1234567%') AS mentions
        """,
        conversation,
    )
    assert dict(counts) == {"turns": 0, "summaries": 0, "jobs": 0, "mentions": 0}


async def test_recall_across_a_users_conversations_is_opt_in(
    client: KontextClient, pool: asyncpg.Pool
) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    first = await client.chat(
        model="tiny",
        user=user,
        messages=[{"role": "user", "content": "My dog is called Biscuit."}],
        max_tokens=8,
        timeout=60,
    )
    assert first.status == "succeeded"

    async def embedded() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT bool_and(embedding IS NOT NULL) FROM turns WHERE conversation_id = $1",
                first.conversation_id,
            )
        )

    await wait_for(embedded, timeout=30)
    question = [{"role": "user", "content": "What is my dog called?"}]
    scoped = await client.chat(
        model="tiny",
        user=user,
        recall_scope="user",
        messages=question,
        max_tokens=8,
        include_prompt=True,
        timeout=60,
    )
    private = await client.chat(
        model="tiny", user=user, messages=question, max_tokens=8, include_prompt=True, timeout=60
    )
    stranger = await client.chat(
        model="tiny",
        user=f"other-{user}",
        recall_scope="user",
        messages=question,
        max_tokens=8,
        include_prompt=True,
        timeout=60,
    )
    for reply in (scoped, private, stranger):
        assert reply.result is not None and reply.result.context is not None
    assert scoped.result and scoped.result.context and scoped.result.context.prompt
    assert "Biscuit" in scoped.result.context.prompt
    assert any(m.conversation_id == first.conversation_id for m in scoped.result.context.memories)
    assert (
        private.result
        and private.result.context
        and "Biscuit" not in (private.result.context.prompt or "")
    )
    assert (
        stranger.result
        and stranger.result.context
        and "Biscuit" not in (stranger.result.context.prompt or "")
    )
