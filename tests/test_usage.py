"""Usage accounting: ``GET /v1/usage`` equals the sum of the tenant's results' usage,
counted once per job even when a reply is delivered again."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from kontext.store import keys
from schemas.events import ChatCompletion, JobReply
from tests.conftest import Stack, wait_for


async def _run(http: httpx.AsyncClient, content: str, conversation: str) -> dict[str, Any]:
    job = await http.post(
        "/v1/jobs",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 3,
            "conversation_id": conversation,
        },
    )
    assert job.status_code == 202, job.text
    done = await http.get(f"/v1/jobs/{job.json()['id']}", params={"wait": 30})
    view: dict[str, Any] = done.json()
    assert view["status"] == "succeeded", view
    return view


async def test_usage_totals_match_the_results_and_count_each_job_once(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    tenant = f"use-{uuid.uuid4().hex[:6]}"
    first = await keys.create(pool, tenant)
    second = await keys.create(pool, tenant)
    conversation = f"usage-{uuid.uuid4().hex[:8]}"
    views: list[dict[str, Any]] = []
    by_key: dict[str, int] = {}
    for n, key in enumerate([first, second, first, first]):
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {key.key}"}, timeout=60
        ) as http:
            view = await _run(http, f"message number {n} about usage", conversation)
        views.append(view)
        by_key[key.prefix] = by_key.get(key.prefix, 0) + 1

    def expected(chosen: list[dict[str, Any]]) -> dict[str, int]:
        prompt = sum(v["result"]["usage"]["prompt_tokens"] for v in chosen)
        completion = sum(v["result"]["usage"]["completion_tokens"] for v in chosen)
        return {
            "requests": len(chosen),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    found: dict[str, Any] = {}
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {first.key}"}, timeout=30
    ) as http:

        async def counted(total: dict[str, int]) -> bool:
            found.clear()
            found.update((await http.get("/v1/usage")).json())
            return bool(found["totals"] == total)

        await wait_for(lambda: counted(expected(views)), timeout=30, interval=0.1)
        assert found["tenant"] == tenant
        assert [m["model"] for m in found["by_model"]] == ["tiny"]
        assert found["by_model"][0]["requests"] == len(views)
        assert {k["prefix"]: k["requests"] for k in found["by_key"]} == by_key

        # The first reply delivered again, then a new job of the same conversation: its
        # reply follows the duplicate on the same partition, so once it is counted the
        # duplicate has been seen, and it added nothing.
        producer = AIOKafkaProducer(bootstrap_servers=stack.settings.bootstrap)
        await producer.start()
        try:
            again = JobReply(
                job_id=views[0]["id"],
                conversation_id=conversation,
                tenant_id=tenant,
                status="succeeded",
                result=ChatCompletion.model_validate(views[0]["result"]),
            )
            await producer.send_and_wait(
                stack.settings.topics.replies, again.encode(), key=conversation.encode()
            )
        finally:
            await producer.stop()
        views.append(await _run(http, "one more", conversation))
        await wait_for(lambda: counted(expected(views)), timeout=30, interval=0.1)

    # Another tenant's usage is its own.
    other = await keys.create(pool, f"use-{uuid.uuid4().hex[:6]}")
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {other.key}"}
    ) as http:
        empty = (await http.get("/v1/usage")).json()
    assert empty["totals"]["requests"] == 0 and empty["by_model"] == []
