"""The smollm2 engine with continuous batching (``KONTEXT_SMOLLM2_BATCHING=continuous``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from kontext.settings import Settings
from producers.client import KontextClient
from schemas.events import ChatMessage, ContextInfo, EnrichedRequest
from tests.conftest import run_inference, stack_env, start_stack
from tests.factories import ask, job_request
from workers.engines import concurrent_batches, load_engine, smollm2
from workers.engines.base import ContinuousEngine, Engine
from workers.engines.continuous import ContinuousHFEngine

# float32: the two ways of batching then agree to the log-probability. In bfloat16 (the
# default on a CPU with AMX) padding moves the rounding, and log-probabilities by hundredths.
STATIC = Settings(smollm2_batching="static", torch_dtype="float32")
CONTINUOUS = STATIC.model_copy(update={"smollm2_batching": "continuous"})

TEXTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow and say which one you like best, and why.",
    "Hi",
    "Write one sentence about the sea at night, with the moon over the water.",
]
STORY = "Tell me a long story about a lighthouse keeper and a storm."


@pytest.fixture(scope="module")
async def static() -> AsyncIterator[Engine]:
    engine = await load_engine("smollm2", STATIC)
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def continuous() -> AsyncIterator[Engine]:
    engine = await load_engine("smollm2", CONTINUOUS)
    assert isinstance(engine, ContinuousHFEngine)
    yield engine
    await engine.close()


async def test_greedy_answers_are_the_static_engines(static: Engine, continuous: Engine) -> None:
    # Prompts of different lengths: the static engine pads them, the continuous one does not.
    limits = (40, 12, 24, 6)
    batch = [ask(static, text, n) for text, n in zip(TEXTS, limits, strict=True)]
    want = await static.generate(batch)
    got = await continuous.generate(batch)
    assert [g.text for g in got] == [w.text for w in want]
    assert [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in got] == [
        (w.prompt_tokens, w.completion_tokens, w.finish_reason) for w in want
    ]
    assert "Paris" in got[0].text
    assert got[3].finish_reason == "length" and got[3].completion_tokens == 6
    for g, w in zip(got, want, strict=True):
        assert g.mean_logprob == pytest.approx(w.mean_logprob, abs=1e-3)


async def test_stop_sequences_cut_its_answers_as_the_static_engines(
    static: Engine, continuous: Engine
) -> None:
    stops = [("Paris",), ("the", "a"), (), ("moon", "\n")]
    batch = [
        replace(ask(static, text, 24), stop=stop) for text, stop in zip(TEXTS, stops, strict=True)
    ]
    want = await static.generate(batch)
    assert want[0].finish_reason == "stop" and "Paris" not in want[0].text
    assert await continuous.generate(batch) == want


async def test_log_probabilities_are_the_static_engines(static: Engine, continuous: Engine) -> None:
    batch = [replace(ask(static, text, 12), logprobs=True) for text in TEXTS]
    want = await static.generate(batch)
    for got, expected in zip(await continuous.generate(batch), want, strict=True):
        assert got.tokens is not None and expected.tokens is not None
        assert [t.bytes for t in got.tokens] == [t.bytes for t in expected.tokens]
        assert [t.logprob for t in got.tokens] == pytest.approx(
            [t.logprob for t in expected.tokens], abs=1e-3
        )


async def test_a_nucleus_of_the_likeliest_token_alone_samples_the_greedy_answer(
    static: Engine, continuous: Engine
) -> None:
    """top_p 0 keeps only the likeliest token, whatever the temperature."""
    greedy = [ask(static, text, 16) for text in TEXTS]
    nucleus = [replace(r, temperature=1.5, top_p=top_p) for r in greedy for top_p in (0.0, 1e-6)]
    want = [a.text for a in await static.generate(greedy) for _ in range(2)]
    for engine in (static, continuous):
        # Beside a request sampled from every token (on the continuous engine, in a
        # batch of its own, which filters no scores).
        *got, free = await engine.generate([*nucleus, replace(greedy[0], temperature=1.5)])
        assert [a.text for a in got] == want
        assert 0 < free.completion_tokens <= 16


async def test_a_prompt_prefilled_in_chunks_beside_decoding_requests(static: Engine) -> None:
    """Steps of 64 tokens: the long prompt is prefilled over several steps, each later
    chunk attending to the keys before it, while the short requests already decode in
    the same steps; every answer is still the static engine's."""
    chunked = await load_engine("smollm2", CONTINUOUS.model_copy(update={"step_tokens": 64}))
    model = chunked.model  # type: ignore[attr-defined]
    try:
        long = " ".join(TEXTS * 6) + " Now answer the first question only."
        batch = [ask(static, TEXTS[0], 12), ask(static, long, 12), ask(static, TEXTS[2], 20)]
        want = await static.generate(batch)
        got = await chunked.generate(batch)
        assert want[1].prompt_tokens > 3 * 64
        assert [g.text for g in got] == [w.text for w in want]
        for g, w in zip(got, want, strict=True):
            assert g.mean_logprob == pytest.approx(w.mean_logprob, abs=1e-3)
    finally:
        await chunked.close()
    assert model.config._attn_implementation == "sdpa"  # its own attention is back


async def test_a_repeated_prompt_reads_the_kept_blocks_until_they_are_forgotten(
    continuous: Engine,
) -> None:
    engine = continuous
    assert isinstance(engine, ContinuousHFEngine)
    request = ask(engine, " ".join(TEXTS * 4), 8)
    (first,) = await engine.generate([request])
    before = engine.prefix_cached_tokens
    (again,) = await engine.generate([request])
    kept = engine.prefix_cached_tokens - before
    # Whole blocks of 16 only, and never the last prompt token, whose logits are needed.
    assert first.prompt_tokens - 2 * 16 <= kept < first.prompt_tokens
    assert again.text == first.text
    await engine.forget_prefixes()
    before = engine.prefix_cached_tokens
    (cold,) = await engine.generate([request])
    assert engine.prefix_cached_tokens == before
    assert cold.text == first.text


async def test_a_short_request_does_not_wait_for_a_long_one(continuous: Engine) -> None:
    story = ask(continuous, STORY, 160)
    long = asyncio.create_task(continuous.generate([story]))
    (short,) = await asyncio.wait_for(
        continuous.generate([ask(continuous, TEXTS[0], 2)]), timeout=60
    )
    assert short.completion_tokens == 2
    assert not long.done()  # it joined the long one's batch and left it first
    (told,) = await asyncio.wait_for(long, timeout=120)
    assert told.completion_tokens > 2


async def test_each_answer_of_a_batch_is_handed_over_when_its_own_request_ends(
    continuous: Engine,
) -> None:
    assert isinstance(continuous, ContinuousEngine)
    story, short = await continuous.generate_each(
        [ask(continuous, STORY, 96), ask(continuous, TEXTS[0], 2)]
    )
    done, _ = await asyncio.wait([story, short], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    assert done == {short}
    assert short.result().completion_tokens == 2
    told = await asyncio.wait_for(story, timeout=120)
    assert told.completion_tokens > 2


def _enriched(engine: Engine, text: str, max_tokens: int) -> EnrichedRequest:
    message = ChatMessage(role="user", content=text)
    prompt = engine.tokenizer.render([message])
    return EnrichedRequest(
        request=job_request(text, model=engine.name, max_tokens=max_tokens),
        prompt=prompt,
        context=ContextInfo(prompt_tokens=engine.tokenizer.count(prompt)),
        new_turns=[],
    )


async def test_the_inference_worker_publishes_each_answer_when_its_request_ends(
    broker: EmbeddedBroker, continuous: Engine
) -> None:
    """One micro-batch of a long answer and a short one, on the real broker: the short
    one's completion reaches the completions topic first, stamped with its batch's
    start and an earlier end than the long one's, which follows once written."""
    story, short = _enriched(continuous, STORY, 96), _enriched(continuous, TEXTS[0], 2)
    first, second = await run_inference(broker, continuous, [story, short])
    assert first.job_id == short.request.job_id and second.job_id == story.request.job_id
    assert first.usage is not None and first.usage.completion_tokens == 2
    assert second.usage is not None and second.usage.completion_tokens > 2
    assert first.batched_at is not None and first.batched_at == second.batched_at
    assert first.generated_at is not None and second.generated_at is not None
    assert first.batched_at < first.generated_at < second.generated_at


async def test_sampled_and_greedy_requests_share_a_call(static: Engine, continuous: Engine) -> None:
    greedy = ask(continuous, TEXTS[0], 16)
    sampled = [ask(continuous, TEXTS[1], 16, temperature=1.0) for _ in range(3)]
    (want,) = await static.generate([greedy])
    got = await continuous.generate([sampled[0], greedy, *sampled[1:]])
    assert got[1].text == want.text
    for answer in (got[0], *got[2:]):
        assert 0 < answer.completion_tokens <= 16
        assert answer.mean_logprob is not None and answer.mean_logprob <= 0


def test_the_kv_cache_must_hold_a_whole_context_window(static: Engine) -> None:
    with pytest.raises(ValueError, match="below the context window"):
        ContinuousHFEngine(
            "smollm2",
            static.model,  # type: ignore[attr-defined]
            static.tokenizer,  # type: ignore[arg-type]
            8192,
            kv_cache_tokens=4096,
        )
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        Settings(kv_cache_tokens=4096)


def test_the_default_is_continuous_on_a_cpu_and_static_on_a_gpu() -> None:
    import torch

    assert Settings().smollm2_batching == "auto"
    on_gpu = torch.cuda.is_available()
    assert smollm2.batching(Settings()) == ("static" if on_gpu else "continuous")
    assert smollm2.batching(Settings(device="cpu")) == "continuous"
    assert smollm2.batching(Settings(smollm2_batching="static")) == "static"


def test_the_inference_worker_gives_it_several_batches_at_once() -> None:
    assert concurrent_batches("smollm2", Settings(device="cpu")) == 4
    assert concurrent_batches("smollm2", CONTINUOUS) == 4
    assert concurrent_batches("smollm2", Settings(smollm2_batching="static")) == 1
    assert concurrent_batches("vllm", Settings()) == 4
    assert concurrent_batches("null", Settings()) == 1


async def test_the_pipeline_answers_every_turn_through_a_continuous_engine(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    """Through the whole stack: micro-batches in flight at once share the engine's
    batch, every conversation's second turn carries its first, and the stack stops
    cleanly (the batching thread ends with it)."""
    env = stack_env(broker, database, prefix=f"cb{uuid.uuid4().hex[:8]}")
    env["KONTEXT_SMOLLM2_BATCHING"] = "continuous"
    stack = start_stack(["up", "--engine", "smollm2", "--port", "0"], env, workdir)
    try:
        settings = stack.settings
        async with KontextClient(
            stack.api_url, settings.bootstrap, topics=settings.topics, api_key=stack.api_key
        ) as client:

            async def converse(n: int) -> str:
                conversation = f"cb-{uuid.uuid4().hex[:6]}-{n}"
                for text in (f"My name is Ada{n}.", "What is the capital of France?"):
                    reply = await client.chat(
                        model="smollm2",
                        conversation_id=conversation,
                        messages=[{"role": "user", "content": text}],
                        max_tokens=24,
                        include_prompt=True,
                        timeout=180,
                    )
                    assert reply.status == "succeeded" and reply.result is not None
                assert reply.result.context is not None
                assert f"My name is Ada{n}." in reply.result.context.prompt
                return reply.result.choices[0].message.content

            answers = await asyncio.gather(*(converse(n) for n in range(6)))
        assert all(answer.strip() for answer in answers), answers
    finally:
        code = stack.stop(timeout=60)
    output = "".join(stack.output)
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
