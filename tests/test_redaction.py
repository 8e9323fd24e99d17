"""PII redaction finds e-mail addresses, phone numbers and card numbers, leaves
ordinary numbers (dates, codes, order numbers) alone, and, when the deployment
turns it on, keeps PII out of everything stored and out of the model's prompt."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from schemas.events import JobCompletion, TurnRecord
from tests.conftest import stack_env, start_stack
from workers.policies.redaction import PiiRedaction, Redactor, luhn_valid

redact = Redactor("US")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "mail me at [EMAIL] please"),
        ("card 4111 1111 1111 1111, exp 12/29", "card [CARD], exp 12/29"),
        ("pay with 5500-0055-5555-5559", "pay with [CARD]"),
        ("call (415) 555-2671 now", "call [PHONE] now"),
        ("from London: +44 20 7946 0958", "from London: [PHONE]"),
        ("tel 650-253-0000; mail a@b.io", "tel [PHONE]; mail [EMAIL]"),
    ],
)
def test_pii_is_replaced_by_a_marker(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "my locker code is 4821",
        "order 12345 shipped on 2026-11-26 at 10:45",
        "4111 1111 1111 1112 fails the Luhn check",
        "ISBN 978-3-16-148410-0",
        "version 1.2.3.4 of the spec",
    ],
)
def test_ordinary_numbers_are_left_alone(text: str) -> None:
    assert redact(text) == text


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")


def test_national_numbers_follow_the_region() -> None:
    assert Redactor("GB")("ring 020 7946 0958") == "ring [PHONE]"


def test_the_step_redacts_an_answer_and_its_stored_turn() -> None:
    step = PiiRedaction("US")
    done = JobCompletion(
        job_id=uuid.uuid4(),
        conversation_id="c",
        model="tiny",
        status="succeeded",
        output="Sure: write to help@example.org or call (415) 555-2671.",
        new_turns=[
            TurnRecord(role="user", content="how do I reach you?", tokens=5),
            TurnRecord(role="assistant", content="(raw)", tokens=9),
        ],
    )
    redacted = step.rewrite_completion(done)
    assert redacted.output == "Sure: write to [EMAIL] or call [PHONE]."
    assert [t.content for t in redacted.new_turns] == ["how do I reach you?", redacted.output]


async def test_pii_never_reaches_the_ledger_the_memory_or_the_model(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path, pool: asyncpg.Pool
) -> None:
    env = stack_env(broker, database, prefix=f"p{uuid.uuid4().hex[:8]}")
    env["KONTEXT_REDACT_PII"] = "true"
    stack = start_stack(["up", "--engine", "tiny", "--port", "0"], env, workdir)
    said = "I am jane.doe@example.com, card 4111 1111 1111 1111, phone (415) 555-2671."
    try:
        async with httpx.AsyncClient(
            base_url=stack.api_url, headers=stack.headers, timeout=60
        ) as http:
            submitted = await http.post(
                "/v1/jobs",
                json={
                    "model": "tiny",
                    "messages": [{"role": "user", "content": said}],
                    "include_prompt": True,
                },
            )
            assert submitted.status_code == 202, submitted.text
            job = submitted.json()
            while job["status"] not in ("succeeded", "failed"):
                job = (await http.get(f"/v1/jobs/{job['id']}", params={"wait": 30})).json()
            assert job["status"] == "succeeded"
            conversation = (await http.get(f"/v1/conversations/{job['conversation_id']}")).json()
    finally:
        assert stack.stop() == 0
    expected = "I am [EMAIL], card [CARD], phone [PHONE]."
    assert job["result"]["context"]["prompt"].count(expected) == 1  # what the model saw
    assert conversation["turns"][0]["content"] == expected
    stored = await pool.fetchval("SELECT request::text FROM jobs WHERE id = $1::uuid", job["id"])
    for secret in ("jane.doe", "4111", "555-2671"):
        assert secret not in stored
        assert secret not in str(conversation)
