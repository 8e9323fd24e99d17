"""``kontext up --engine vllm`` end to end: HTTP in, Kafka, the inference worker on vLLM's
real engine, Postgres, reply out; then a clean shutdown. Run from .venv-vllm."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from producers.client import KontextClient
from tests.conftest import Stack, _operator_key, stack_env, start_stack
from tests.scrape import scrape

pytest.importorskip("vllm.v1.engine.async_llm", reason="run from .venv-vllm (make test)")

TIMEOUT_S = 300
# Over two of vLLM's 128-token KV blocks on CPU, so the next turn's prompt repeats whole blocks.
STORY = " ".join(f"On day {n} the lighthouse keeper counted {n * 7} gulls." for n in range(30))


@pytest.fixture(scope="module")
def vllm_stack(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> Iterator[Stack]:
    env = stack_env(broker, database, prefix=f"v{uuid.uuid4().hex[:8]}")
    env.update(KONTEXT_CONTEXT_BUDGET_TOKENS="2048", KONTEXT_SUMMARY_TRIGGER_TOKENS="4096")
    # Micro-batches of two: the four first turns below are two batches, in flight at
    # once (the vllm engine takes several), merged by vLLM's continuous batching.
    env.update(KONTEXT_BATCH_MAX_SIZE="2")
    stack = start_stack(["up", "--engine", "vllm", "--port", "0"], env, workdir)
    stack.operator_key = asyncio.run(_operator_key(database.url))
    yield stack
    stack.stop()


async def cached_tokens(stack: Stack) -> float:
    """The engine's prefix-cache hits so far, from the API's Prometheus metrics."""
    return (await scrape(stack)).value("kontext_engine_prefix_cached_tokens_total", model="vllm")


async def test_conversations_run_through_the_pipeline_and_reuse_the_prefix_cache(
    vllm_stack: Stack, pool: asyncpg.Pool
) -> None:
    stack = vllm_stack
    async with KontextClient(
        stack.api_url, stack.settings.bootstrap, topics=stack.settings.topics, api_key=stack.api_key
    ) as client:
        # First turns of four conversations at once: two micro-batches in flight together.
        openers = [STORY, "Hi!", "What is the capital of France?", "Name a color."]
        firsts = await asyncio.gather(
            *(
                client.chat(
                    model="vllm",
                    messages=[{"role": "user", "content": text}],
                    max_tokens=8,
                    timeout=TIMEOUT_S,
                )
                for text in openers
            )
        )
        for reply in firsts:
            assert reply.status == "succeeded" and reply.result is not None
            assert reply.result.model == "vllm"
            assert reply.result.choices[0].message.content.strip()
            assert 0 < reply.result.usage.completion_tokens <= 8
        before = await cached_tokens(stack)

        second = await client.chat(
            model="vllm",
            conversation_id=firsts[0].conversation_id,
            messages=[{"role": "user", "content": "How many gulls on day 3?"}],
            max_tokens=8,
            include_prompt=True,
            timeout=TIMEOUT_S,
        )

        assert second.status == "succeeded" and second.result is not None
        context = second.result.context
        assert context is not None and context.prompt is not None and STORY in context.prompt
        assert await cached_tokens(stack) - before >= 256
    turns = await pool.fetch(
        "SELECT role, content FROM turns WHERE conversation_id = $1 ORDER BY seq",
        firsts[0].conversation_id,
    )
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[3]["content"] == second.result.choices[0].message.content


def test_shutdown_leaves_no_child_process(vllm_stack: Stack) -> None:
    children = psutil.Process(vllm_stack.process.pid).children(recursive=True)
    assert children, "vLLM runs its engine core in a child process"

    assert vllm_stack.stop() == 0, "".join(vllm_stack.output[-40:])

    # vLLM's engine process is gone already; multiprocessing's resource tracker exits
    # when it sees its parent gone.
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
