"""Human review end to end: a held result is recorded, replied to and delivered by
webhook only after a reviewer approves or replaces it.

This module runs its own ``kontext up`` serving ``null`` (mean log-probability
0: never unsure) and ``tiny`` (random weights: always unsure) with a
log-probability threshold of -1 and the pattern ``escalate``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.store import keys
from producers.backfill import create_batch
from schemas.events import ContextInfo, EnrichedRequest
from tests.conftest import Stack, stack_env, start_stack, wait_for
from tests.factories import batch_line, job_request, jsonl
from tests.receiver import Receiver, serving
from workers.completions import completion_for
from workers.engines.base import Generation
from workers.policies.review import HumanReview

PATTERN = r"(?i)\bescalate\b"


@pytest.fixture(scope="module")
def review_stack(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Stack]:
    env = stack_env(broker, database, prefix=f"r{uuid.uuid4().hex[:8]}")
    env.update(KONTEXT_REVIEW_LOGPROB_THRESHOLD="-1", KONTEXT_REVIEW_PATTERNS=PATTERN)
    running = start_stack(
        ["up", "--engine", "null", "--engine", "tiny", "--port", "0"], env, workdir
    )
    yield running
    assert running.stop() == 0, "".join(running.output[-40:])


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


@pytest.fixture
async def http(review_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=review_stack.api_url, headers=review_stack.headers, timeout=90
    ) as client:
        yield client


async def _submit(
    http: httpx.AsyncClient, model: str, content: str, **extra: Any
) -> dict[str, Any]:
    response = await http.post(
        "/v1/jobs",
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **extra,
        },
    )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def _status(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    view: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
    return view


async def _held(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Wait until the job is held; its pending review."""

    async def held() -> bool:
        return (await _status(http, job_id))["status"] == "needs_review"

    await wait_for(held, timeout=60, interval=0.1)
    pending = (await http.get("/v1/reviews")).json()["data"]
    found = [r for r in pending if r["job_id"] == job_id]
    assert len(found) == 1, pending
    review: dict[str, Any] = found[0]
    return review


async def _final(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    view = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 60})).json()
    assert view["status"] == "succeeded", view
    return dict(view)


async def _not_delivered(pool: asyncpg.Pool, receiver: Receiver, hook: str, job_id: str) -> None:
    """Held: no result, no reply, no stored turn, no webhook delivery."""
    row = await pool.fetchrow(
        "SELECT status, result, replied_at FROM jobs WHERE id = $1", uuid.UUID(job_id)
    )
    assert row is not None
    assert (row["status"], row["result"], row["replied_at"]) == ("needs_review", None, None)
    job = uuid.UUID(job_id)
    assert await pool.fetchval("SELECT count(*) FROM turns WHERE job_id = $1", job) == 0
    deliveries = await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE job_id = $1", job
    )
    assert deliveries == 0
    assert receiver.calls[hook] == []


async def test_a_result_matching_a_pattern_is_delivered_only_once_approved(
    http: httpx.AsyncClient, pool: asyncpg.Pool, receiver: Receiver
) -> None:
    hook = f"approve-{uuid.uuid4().hex[:6]}"
    job = await _submit(
        http,
        "null",
        "Please escalate my case.",
        webhook={"url": f"{receiver.url}/hooks/{hook}"},
        logprobs=True,
    )
    review = await _held(http, job["id"])
    assert review["status"] == "pending"
    timeline = (await http.get(f"/v1/jobs/{job['id']}", params={"timeline": True})).json()
    stages = timeline["timeline"]
    assert stages["enriched"] and stages["batched"] and stages["generated"], stages
    assert stages["recorded"] is None and stages["replied"] is None
    assert review["reasons"] == [f"request_pattern: {PATTERN}"]
    assert review["original_output"] == "ok" and review["mean_logprob"] == 0.0
    assert review["request"] == [{"role": "user", "content": "Please escalate my case."}]
    await _not_delivered(pool, receiver, hook, job["id"])

    decided = await http.post(
        f"/v1/jobs/{job['id']}/review", json={"action": "approve", "note": "looks fine"}
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["status"] == "approved"

    view = await _final(http, job["id"])
    assert view["result"]["choices"][0]["message"]["content"] == "ok"
    assert view["result"]["context"]["review"] == "approved"
    assert [t["token"] for t in view["result"]["choices"][0]["logprobs"]["content"]] == ["ok"]
    await wait_for(lambda: len(receiver.calls[hook]) == 1, timeout=90, interval=0.1)
    assert receiver.calls[hook][0].json()["data"]["status"] == "succeeded"

    # Decided once: a second decision is refused, nothing is published again.
    again = await http.post(f"/v1/jobs/{job['id']}/review", json={"action": "approve"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conflict"
    stored = await pool.fetchrow("SELECT * FROM reviews WHERE job_id = $1", uuid.UUID(job["id"]))
    assert stored is not None
    assert stored["status"] == "approved" and stored["note"] == "looks fine"
    assert stored["original_output"] == stored["final_output"] == "ok"
    assert stored["reviewer"] and stored["decided_at"] is not None
    await wait_for(
        lambda: pool.fetchval(
            "SELECT replied_at IS NOT NULL FROM jobs WHERE id = $1", uuid.UUID(job["id"])
        ),
        timeout=10,
    )
    deliveries = (await http.get("/v1/webhooks/deliveries", params={"job_id": job["id"]})).json()
    assert len(deliveries["data"]) == 1


async def test_an_unsure_answer_is_replaced_by_the_reviewer_and_memory_keeps_the_replacement(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    conversation = f"rev-{uuid.uuid4().hex[:8]}"
    job = await _submit(http, "tiny", "hello there", conversation_id=conversation, logprobs=True)
    review = await _held(http, job["id"])
    assert review["reasons"][0].startswith("logprob: ")
    assert review["mean_logprob"] < -1

    replacement = "A reviewer wrote this answer."
    decided = await http.post(
        f"/v1/jobs/{job['id']}/review",
        json={"action": "replace", "content": replacement, "note": "model was unsure"},
    )
    assert decided.status_code == 200, decided.text
    assert decided.json()["final_output"] == replacement

    view = await _final(http, job["id"])
    assert view["result"]["choices"][0]["message"]["content"] == replacement
    assert view["result"]["context"]["review"] == "replaced"
    assert view["result"]["choices"][0]["logprobs"] is None  # the model's were another text's
    turns = (await http.get(f"/v1/conversations/{conversation}")).json()["turns"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "hello there"),
        ("assistant", replacement),
    ]
    stored = await pool.fetchrow("SELECT * FROM reviews WHERE job_id = $1", uuid.UUID(job["id"]))
    assert stored is not None
    assert stored["status"] == "replaced"
    assert stored["original_output"] == review["original_output"] != replacement
    assert stored["final_output"] == replacement
    assert stored["mean_logprob"] == pytest.approx(review["mean_logprob"])


async def test_an_ordinary_result_is_not_held(http: httpx.AsyncClient) -> None:
    job = await _submit(http, "null", "hello")
    view = await _final(http, job["id"])
    assert view["result"]["choices"][0]["message"]["content"] == "ok"
    assert view["result"]["context"]["review"] is None
    assert (await http.get(f"/v1/jobs/{job['id']}/review")).status_code == 404


async def test_a_held_turn_holds_its_conversation_until_reviewed(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    conversation = f"gate-{uuid.uuid4().hex[:8]}"
    first = await _submit(http, "null", "escalate this one", conversation_id=conversation)
    await _held(http, first["id"])
    second = await _submit(
        http, "null", "and the next turn", conversation_id=conversation, include_prompt=True
    )

    async def parked() -> bool:
        waiting = await pool.fetchval(
            "SELECT waiting FROM conversations WHERE id = $1", conversation
        )
        return uuid.UUID(second["id"]) in (waiting or [])

    await wait_for(parked, timeout=30, interval=0.1)
    # A redelivered request of the held turn (as after a crash) does not open the gate.
    await pool.fetch(
        "SELECT * FROM kontext_admit_batch($1::uuid[], ARRAY[NULL]::vector[], 20, 4, "
        "interval '300 seconds')",
        [uuid.UUID(first["id"])],
    )
    gate = await pool.fetchrow(
        "SELECT in_flight, waiting FROM conversations WHERE id = $1", conversation
    )
    assert gate is not None and gate["in_flight"] == uuid.UUID(first["id"])
    assert (await _status(http, second["id"]))["status"] == "queued"

    replaced = await http.post(
        f"/v1/jobs/{first['id']}/review", json={"action": "replace", "content": "Noted: 4242."}
    )
    assert replaced.status_code == 200, replaced.text
    view = await _final(http, second["id"])
    assert "Noted: 4242." in view["result"]["context"]["prompt"]


async def test_reviews_are_scoped_to_the_jobs_tenant_and_operators(
    review_stack: Stack, http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job = await _submit(http, "null", "escalate: tenant scope")
    await _held(http, job["id"])
    other = await keys.create(pool, f"other-{uuid.uuid4().hex[:6]}")
    operator = await keys.create(pool, f"ops-{uuid.uuid4().hex[:6]}", operator=True)
    as_other = {"Authorization": f"Bearer {other.key}"}
    as_operator = {"Authorization": f"Bearer {operator.key}"}

    listed = (await http.get("/v1/reviews", headers=as_other)).json()["data"]
    assert all(r["job_id"] != job["id"] for r in listed)
    refused = await http.post(
        f"/v1/jobs/{job['id']}/review", json={"action": "approve"}, headers=as_other
    )
    assert refused.status_code == 404
    async with httpx.AsyncClient(base_url=review_stack.api_url) as anonymous:
        assert (await anonymous.get("/v1/reviews")).status_code == 401
        unauthenticated = await anonymous.post(
            f"/v1/jobs/{job['id']}/review", json={"action": "approve"}
        )
        assert unauthenticated.status_code == 401

    seen = (await http.get("/v1/reviews", headers=as_operator)).json()["data"]
    assert any(r["job_id"] == job["id"] for r in seen)
    approved = await http.post(
        f"/v1/jobs/{job['id']}/review", json={"action": "approve"}, headers=as_operator
    )
    assert approved.status_code == 200, approved.text
    await _final(http, job["id"])


async def test_a_malformed_decision_is_refused(http: httpx.AsyncClient) -> None:
    job = await _submit(http, "null", "escalate: bad decisions")
    await _held(http, job["id"])
    for body in (
        {"action": "replace"},
        {"action": "replace", "content": "  "},
        {"action": "approve", "content": "x"},
        {"action": "delete"},
    ):
        response = await http.post(f"/v1/jobs/{job['id']}/review", json=body)
        assert response.status_code == 422, (body, response.text)
    assert (await _status(http, job["id"]))["status"] == "needs_review"
    missing = await http.post(f"/v1/jobs/{uuid.uuid4()}/review", json={"action": "approve"})
    assert missing.status_code == 404


async def test_a_decision_whose_message_was_lost_is_published_again(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job = await _submit(http, "null", "escalate: lost decision")
    await _held(http, job["id"])
    job_id = uuid.UUID(job["id"])
    # As if the decision was taken and its message then lost with the broker: decided
    # in the ledger, never recorded, past the job's lease.
    await pool.execute(
        """
        WITH aged AS (UPDATE jobs SET updated_at = now() - interval '1 hour' WHERE id = $1)
        UPDATE reviews SET status = 'approved', final_output = original_output,
            decided_at = now() WHERE job_id = $1
        """,
        job_id,
    )
    view = await _final(http, job["id"])
    assert view["result"]["choices"][0]["message"]["content"] == "ok"


async def test_a_held_job_run_again_stays_held_whatever_its_new_answer(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job = await _submit(http, "null", "escalate: run twice")
    await _held(http, job["id"])
    # The step itself, on the real ledger: a redelivered batch ran the job again and
    # its new answer matches nothing; it must not be published past the reviewer.
    step = HumanReview(pool, threshold=None, patterns=["no-such-words"])
    request = job_request(
        "escalate: run twice",
        job_id=uuid.UUID(job["id"]),
        conversation_id=job["conversation_id"],
        model="null",
    )
    item = EnrichedRequest(
        request=request, prompt="p", context=ContextInfo(prompt_tokens=1), new_turns=[]
    )
    rerun = completion_for(item, Generation("fine", 1, 1, "stop", mean_logprob=0.0))
    stranger = item.model_copy(
        update={"request": request.model_copy(update={"job_id": uuid.uuid4()})}
    )
    other = completion_for(stranger, Generation("fine", 1, 1, "stop", mean_logprob=0.0))
    held = await step.after_engine([(item, rerun), (stranger, other)])
    assert held == {request.job_id}
    assert (await _status(http, job["id"]))["status"] == "needs_review"


async def test_a_batch_with_a_held_line_stays_in_progress_until_it_is_decided(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    text = jsonl(
        [
            batch_line("plain", "hello", model="null"),
            batch_line("held", "Please escalate this line.", model="null"),
        ]
    )
    created = await create_batch(http, text.encode())
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    held_id = await pool.fetchval(
        "SELECT id FROM jobs WHERE batch_id = $1 AND custom_id = 'held'", uuid.UUID(batch_id)
    )
    await _held(http, str(held_id))
    since = await pool.fetchval("SELECT now()")

    async def swept() -> bool:  # a sweep recounted the batch once the line was held
        return bool(
            await pool.fetchval(
                "SELECT updated_at > $2 AND completed = 1 FROM batches WHERE id = $1",
                uuid.UUID(batch_id),
                since,
            )
        )

    await wait_for(swept, timeout=60, interval=0.1)
    batch = (await http.get(f"/v1/batches/{batch_id}")).json()
    assert batch["status"] == "in_progress" and batch["output_file_id"] is None
    decided = await http.post(f"/v1/jobs/{held_id}/review", json={"action": "approve"})
    assert decided.status_code == 200, decided.text

    async def completed() -> bool:
        batch.update((await http.get(f"/v1/batches/{batch_id}")).json())
        return batch["status"] == "completed"

    await wait_for(completed, timeout=60, interval=0.1)
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    output = await http.get(f"/v1/files/{batch['output_file_id']}/content")
    assert sorted(orjson.loads(line)["custom_id"] for line in output.content.splitlines()) == [
        "held",
        "plain",
    ]
