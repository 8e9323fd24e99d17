"""The OpenAI-compatible API through the official ``openai`` SDK: chat completions
(stateless, with a conversation, streamed), models, errors, and a request that
waits longer than it may (504, the job carries on).

The 504 runs on a stack of its own (``null`` engine, a 1 s wait, results
mentioning ``escalate`` held for human review, so its job is deterministically
not final in time); everything else runs on the session stack.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.store import keys
from tests.conftest import Stack, stack_env, start_stack

FACT = "Remember this: the vault code is 7391."


def _client(stack: Stack, api_key: str | None = None) -> openai.AsyncOpenAI:
    """The SDK against ``stack``, without its own retries (each request is one job)."""
    return openai.AsyncOpenAI(
        base_url=f"{stack.api_url}/v1",
        api_key=api_key or stack.api_key,
        max_retries=0,
        timeout=120,
    )


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with _client(stack) as client:
        yield client


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=120
    ) as client:
        yield client


def _context(completion: Any) -> dict[str, Any]:
    """Kontext's ``context`` beside the OpenAI fields of a completion."""
    extra = completion.model_extra or {}
    context: dict[str, Any] = extra["context"]
    return context


def _job_id(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-")
    return completion_id.removeprefix("chatcmpl-")


async def test_a_stateless_request_prompts_with_all_its_messages_and_nothing_else(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[
            {"role": "developer", "content": "You keep secrets well."},
            {"role": "user", "content": FACT},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": [{"type": "text", "text": "What is the vault code?"}]},
        ],
        max_tokens=8,
        extra_body={"include_prompt": True},
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == "tiny"
    [choice] = completion.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage is not None
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    prompt = _context(completion)["prompt"]
    assert prompt.startswith("<|system|>\nYou keep secrets well.\n")
    assert "7391" in prompt and "Noted." in prompt
    assert prompt.endswith("What is the vault code?\n<|assistant|>\n")

    # The answer is the job's: the same one /v1/jobs has.
    job_id = _job_id(completion.id)
    assert raw.headers["x-kontext-job-id"] == job_id
    view = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert view["status"] == "succeeded"
    assert view["result"]["choices"][0]["message"]["content"] == choice.message.content

    # A second stateless request sees nothing of the first.
    again = await sdk.chat.completions.with_raw_response.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is the vault code?"}],
        max_tokens=8,
        extra_body={"include_prompt": True},
    )
    second = again.parse()
    assert again.headers["x-kontext-conversation-id"] != raw.headers["x-kontext-conversation-id"]
    context = _context(second)
    assert "7391" not in context["prompt"]
    assert context["turns"] == [] and context["memories"] == [] and context["summaries"] == []


async def test_a_conversation_remembers_what_an_earlier_turn_said(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    conversation = f"openai-{uuid.uuid4().hex[:8]}"
    first = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": FACT}],
        max_tokens=8,
        extra_body={"conversation_id": conversation},
    )
    # The next turn names the conversation by header, and sends only its new message.
    second = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is the vault code?"}],
        max_tokens=8,
        extra_body={"include_prompt": True},
        extra_headers={"X-Kontext-Conversation-Id": conversation},
    )
    context = _context(second)
    assert "7391" in context["prompt"]
    assert context["turns"] == [1, 2]
    assert first.choices[0].message.content in context["prompt"]

    stored = (await http.get(f"/v1/conversations/{conversation}")).json()
    assert [t["role"] for t in stored["turns"]] == ["user", "assistant", "user", "assistant"]
    assert stored["turns"][0]["content"] == FACT


async def test_a_streamed_answer_arrives_as_chunks_ending_with_done(
    sdk: openai.AsyncOpenAI, stack: Stack, http: httpx.AsyncClient
) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about rivers."}]
    stream = await sdk.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    received = [chunk async for chunk in stream]
    assert {c.object for c in received} == {"chat.completion.chunk"}
    assert len({c.id for c in received}) == 1
    assert received[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    finished = [c.choices[0].finish_reason for c in received if c.choices]
    assert finished[-1] in ("stop", "length") and set(finished[:-1]) == {None}
    *_, last = received
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0

    view = (await http.get(f"/v1/jobs/{_job_id(received[0].id)}")).json()
    assert view["result"]["choices"][0]["message"]["content"] == content

    # On the wire: Server-Sent Events, the last one [DONE].
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 4  # role, content, finish reason (no usage asked for)


async def test_an_answer_ends_before_its_stop_sequence_and_is_remembered_so(
    sdk: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    count: Any = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = await sdk.chat.completions.create(model="smollm2", messages=count, max_tokens=40)
    text = full.choices[0].message.content
    assert text is not None and text.startswith("1, 2, 3, 4, 5"), text
    # The same deterministic prompt again, now with stop sequences: not the cached answer.
    conversation = f"stop-{uuid.uuid4().hex[:8]}"
    cut = await sdk.chat.completions.create(
        model="smollm2",
        messages=count,
        max_tokens=40,
        stop=["5", "nine"],
        extra_body={"conversation_id": conversation},
    )
    [choice] = cut.choices
    assert (choice.message.content, choice.finish_reason) == ("1, 2, 3, 4, ", "stop")
    assert cut.usage is not None and full.usage is not None
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    assert not _context(cut)["cached"]
    stored = (await http.get(f"/v1/conversations/{conversation}")).json()
    assert stored["turns"][-1]["content"] == "1, 2, 3, 4, "
    # One string is one stop sequence, as OpenAI takes it.
    single = await sdk.chat.completions.create(
        model="smollm2", messages=count, max_tokens=40, stop=", 3"
    )
    assert single.choices[0].message.content == "1, 2"


async def test_log_probabilities_come_with_the_answer_when_asked(
    sdk: openai.AsyncOpenAI,
) -> None:
    word: Any = [{"role": "user", "content": "Write the word café three times."}]
    plain = await sdk.chat.completions.create(model="smollm2", messages=word, max_tokens=12)
    assert plain.choices[0].logprobs is None
    for _ in range(2):  # the second is not answered from the cache, which keeps none
        scored = await sdk.chat.completions.create(
            model="smollm2", messages=word, max_tokens=12, logprobs=True, top_logprobs=0
        )
        [choice] = scored.choices
        assert choice.message.content == plain.choices[0].message.content
        assert choice.logprobs is not None and choice.logprobs.content is not None
        tokens = choice.logprobs.content
        assert scored.usage is not None and len(tokens) == scored.usage.completion_tokens
        assert b"".join(bytes(t.bytes or []) for t in tokens).decode() == choice.message.content
        assert all(t.logprob <= 0 and t.top_logprobs == [] for t in tokens)
        assert not _context(scored)["cached"]

    stream = await sdk.chat.completions.create(
        model="smollm2", messages=word, max_tokens=12, logprobs=True, stream=True
    )
    streamed = [c.choices[0].logprobs for c in [chunk async for chunk in stream] if c.choices]
    assert [len(p.content or []) for p in streamed if p is not None] == [len(tokens)]

    with pytest.raises(openai.BadRequestError) as alternatives:
        await sdk.chat.completions.create(
            model="smollm2", messages=word, logprobs=True, top_logprobs=2
        )
    assert alternatives.value.param == "top_logprobs"


async def test_top_p_reaches_the_engine(sdk: openai.AsyncOpenAI) -> None:
    """A nucleus of the likeliest token alone samples what greedy decoding answers."""
    hello: Any = [{"role": "user", "content": "hello"}]
    greedy = await sdk.chat.completions.create(model="tiny", messages=hello, max_tokens=8)
    nucleus = await sdk.chat.completions.create(
        model="tiny", messages=hello, max_tokens=8, temperature=1.5, top_p=0
    )
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError):
        await sdk.chat.completions.create(model="tiny", messages=hello, top_p=1.5)


async def test_models_are_listed_and_retrieved(sdk: openai.AsyncOpenAI) -> None:
    listed = [model async for model in sdk.models.list()]
    assert {m.id for m in listed} == {"tiny", "smollm2"}
    assert {m.object for m in listed} == {"model"}
    tiny = await sdk.models.retrieve("tiny")
    assert (tiny.id, tiny.object, tiny.owned_by) == ("tiny", "model", "kontext")
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


async def test_errors_raise_the_sdks_own_exceptions(stack: Stack, sdk: openai.AsyncOpenAI) -> None:
    hello: Any = [{"role": "user", "content": "hello"}]
    async with _client(stack, api_key="kx_not_a_key") as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model="tiny", messages=hello)
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()

    with pytest.raises(openai.NotFoundError) as unknown:
        await sdk.chat.completions.create(model="gpt-4o", messages=hello)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"

    with pytest.raises(openai.BadRequestError) as several:
        await sdk.chat.completions.create(model="tiny", messages=hello, n=2)
    assert several.value.code == "unsupported_parameter" and several.value.param == "n"
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as tools:
        await sdk.chat.completions.create(model="tiny", messages=hello, tools=[tool])
    assert tools.value.param == "tools"

    with pytest.raises(openai.UnprocessableEntityError):
        await sdk.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.UnprocessableEntityError) as stops:
        await sdk.chat.completions.create(model="tiny", messages=hello, stop=list("abcde"))
    assert stops.value.param == "stop"
    with pytest.raises(openai.UnprocessableEntityError) as last:
        await sdk.chat.completions.create(
            model="tiny", messages=[*hello, {"role": "assistant", "content": "Hi."}]
        )
    assert last.value.code == "invalid_request"
    with pytest.raises(openai.UnprocessableEntityError):
        await sdk.chat.completions.create(model="tiny", messages=hello, max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError):
        await sdk.chat.completions.create(
            model="tiny", messages=hello, extra_headers={"X-Kontext-Wait": "soon"}
        )
    with pytest.raises(openai.APIStatusError) as large:
        await sdk.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x" * 1_100_000}]
        )
    assert large.value.status_code == 413

    # A job that fails answers its error: a system prompt too long for any budget.
    with pytest.raises(openai.BadRequestError) as failed:
        await sdk.chat.completions.create(
            model="tiny",
            messages=[{"role": "system", "content": "Be brief. " * 200}, *hello],
        )
    assert failed.value.code == "prompt_too_long"


async def test_a_tenant_over_its_rate_limit_gets_a_rate_limit_error(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    tenant = await keys.create(pool, f"t-{uuid.uuid4().hex[:10]}")
    await pool.execute("UPDATE tenants SET rpm = 1 WHERE id = $1", tenant.tenant_id)
    hello: Any = [{"role": "user", "content": "hello"}]
    async with _client(stack, api_key=tenant.key) as limited:
        await limited.chat.completions.create(model="tiny", messages=hello, max_tokens=4)
        # Refused at the API (Retry-After) or by the enricher (the job fails): 429 alike.
        with pytest.raises(openai.RateLimitError) as refused:
            await limited.chat.completions.create(model="tiny", messages=hello, max_tokens=4)
    assert refused.value.code == "rate_limited"


# A request that outlives its wait (a stack of its own).

PATTERN = r"(?i)\bescalate\b"


@pytest.fixture(scope="module")
def held_stack(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Stack]:
    env = stack_env(broker, database, prefix=f"o{uuid.uuid4().hex[:8]}")
    env.update(KONTEXT_CHAT_WAIT_S="1", KONTEXT_REVIEW_PATTERNS=PATTERN, KONTEXT_EMBEDDER="hash")
    running = start_stack(["up", "--engine", "null", "--port", "0"], env, workdir)
    yield running
    assert running.stop() == 0, "".join(running.output[-40:])


async def test_a_job_outliving_the_wait_answers_504_and_carries_on(
    held_stack: Stack, pool: asyncpg.Pool
) -> None:
    conversation = f"held-{uuid.uuid4().hex[:8]}"
    request: dict[str, Any] = {
        "model": "null",
        "messages": [{"role": "user", "content": "Please escalate my case."}],
        "extra_body": {"conversation_id": conversation},
    }
    # The SDK's default retries: a 504 says not to (it would submit the job again).
    async with openai.AsyncOpenAI(
        base_url=f"{held_stack.api_url}/v1", api_key=held_stack.api_key, timeout=60
    ) as sdk:
        with pytest.raises(openai.InternalServerError) as late:
            await sdk.chat.completions.create(**request)
    error = late.value
    assert error.status_code == 504 and error.code == "timeout"
    job_id = error.response.headers["x-kontext-job-id"]
    assert error.response.headers["location"] == f"/v1/jobs/{job_id}"
    assert isinstance(error.body, dict) and error.body["details"][0]["job_id"] == job_id
    jobs = await pool.fetch("SELECT id FROM jobs WHERE conversation_id = $1", conversation)
    assert [str(j["id"]) for j in jobs] == [job_id]

    async with httpx.AsyncClient(
        base_url=held_stack.api_url, headers=held_stack.headers, timeout=60
    ) as http:
        view = (await http.get(f"/v1/jobs/{job_id}")).json()
        assert view["status"] == "needs_review"
        decided = await http.post(f"/v1/jobs/{job_id}/review", json={"action": "approve"})
        assert decided.status_code == 200, decided.text
        done = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})).json()
    assert done["status"] == "succeeded"
    assert done["result"]["object"] == "chat.completion"
    assert done["result"]["id"] == f"chatcmpl-{job_id}"


async def test_an_idempotency_key_ties_a_retry_to_the_same_job(
    held_stack: Stack, pool: asyncpg.Pool
) -> None:
    key = f"retry-{uuid.uuid4().hex[:8]}"
    request: dict[str, Any] = {
        "model": "null",
        "messages": [{"role": "user", "content": "Escalate this one too."}],
        "extra_headers": {"Idempotency-Key": key},
    }
    async with _client(held_stack) as sdk:
        with pytest.raises(openai.InternalServerError) as late:
            await sdk.chat.completions.create(**request)
        assert late.value.response.headers["x-should-retry"] == "true"
        job_id = late.value.response.headers["x-kontext-job-id"]
        async with httpx.AsyncClient(
            base_url=held_stack.api_url, headers=held_stack.headers, timeout=60
        ) as http:
            decided = await http.post(f"/v1/jobs/{job_id}/review", json={"action": "approve"})
            assert decided.status_code == 200, decided.text
            await http.get(f"/v1/jobs/{job_id}", params={"wait": 30})
        retried = await sdk.chat.completions.create(**request)
    assert retried.id == f"chatcmpl-{job_id}"
    assert retried.choices[0].message.content == "ok"
    count = await pool.fetchval("SELECT count(*) FROM jobs WHERE idempotency_key = $1", key)
    assert count == 1
