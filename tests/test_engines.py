"""The inference engines: batched answers, per-request limits and the SmolLM2 cache."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from kontext.settings import Settings
from schemas.events import ChatMessage
from tests.factories import ask
from workers.engines import context_window, load_engine, load_tokenizer, smollm2
from workers.engines.base import Engine, GenerationRequest, stop_index

QUESTION = [ChatMessage(role="user", content="What is the capital of France?")]
COUNT = "Count from 1 to 10, separated by commas."


@pytest.fixture(scope="module")
async def tiny() -> AsyncIterator[Engine]:
    engine = await load_engine("tiny", Settings())
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def smol() -> AsyncIterator[Engine]:
    engine = await load_engine("smollm2", Settings(smollm2_batching="static"))
    yield engine
    await engine.close()


def test_importing_the_registry_loads_no_model_library() -> None:
    code = (
        "import sys, workers.engines; "
        "assert not {'torch', 'transformers'} & set(sys.modules), 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


async def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'gpt-9'; known engines: smollm2, vllm, tiny, null"):
        await load_engine("gpt-9", Settings())
    with pytest.raises(ValueError, match="known engines: smollm2, vllm, tiny, null"):
        load_tokenizer("gpt-9", Settings())
    with pytest.raises(ValueError, match="known engines: smollm2, vllm, tiny, null"):
        context_window("gpt-9")


async def test_tiny_is_deterministic_across_loads(tiny: Engine) -> None:
    import torch

    batch = [ask(tiny, "Hi", 16), ask(tiny, "What is the capital of France?", 16)]
    first = await tiny.generate(batch)
    torch.manual_seed(1234)  # the global RNG must not matter
    other = await load_engine("tiny", Settings())
    assert await other.generate(batch) == first
    assert await tiny.generate(batch) == first


async def test_tiny_cuts_each_request_at_its_own_max_tokens(tiny: Engine) -> None:
    limits = [1, 7, 30]
    answers = await tiny.generate([ask(tiny, f"question {n}", n) for n in limits])
    for answer, limit in zip(answers, limits, strict=True):
        if answer.finish_reason == "length":
            assert answer.completion_tokens == limit
        else:
            assert answer.completion_tokens < limit


async def test_a_prompt_past_the_context_window_is_refused_by_name(tiny: Engine) -> None:
    """Not an index error from inside the model: the engine says what does not fit."""
    fits = "x" * (context_window("tiny") - 16)
    [answer] = await tiny.generate([GenerationRequest(fits, 16)])
    assert answer.prompt_tokens == len(fits)
    with pytest.raises(ValueError, match="exceed tiny's context window of 1024 tokens"):
        await tiny.generate([GenerationRequest(fits + "x", 16)])


async def test_tiny_answers_in_batch_order(tiny: Engine) -> None:
    batch = [ask(tiny, "Hi", 20), ask(tiny, "A much longer question than the first", 5)]
    batch.append(ask(tiny, "Mixed in: a sampled answer", 8, temperature=1.0))
    batch.append(ask(tiny, "x", 12))
    together = await tiny.generate(batch)
    assert len(together) == len(batch)
    for request, answer in zip(batch, together, strict=True):
        if request.temperature == 0:
            assert [answer] == await tiny.generate([request])
        assert answer.prompt_tokens == tiny.tokenizer.count(request.prompt)
        assert answer.completion_tokens <= request.max_tokens


def test_tiny_template_and_byte_counts() -> None:
    tokenizer = load_tokenizer("tiny", Settings())
    messages = [ChatMessage(role="system", content="Be brief."), *QUESTION]
    assert tokenizer.render(messages) == (
        "<|system|>\nBe brief.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    )
    assert tokenizer.count("héllo") == 6
    assert context_window("tiny") == 1024


def test_smollm2_cache_is_complete(smol: Engine) -> None:
    path = smollm2.ensure_cache(Settings())
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not list(path.parent.glob(".smollm2-*"))
    assert smol.context_window == context_window("smollm2") == 8192


def test_smollm2_template_renders_roles(smol: Engine) -> None:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="Bye"),
    ]
    assert load_tokenizer("smollm2", Settings()).render(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


async def test_smollm2_knows_the_capital_of_france(smol: Engine) -> None:
    tokenizer = load_tokenizer("smollm2", Settings())
    prompt = tokenizer.render(QUESTION)
    short, full = await smol.generate(
        [GenerationRequest(prompt, max_tokens=3), GenerationRequest(prompt, max_tokens=64)]
    )
    assert "Paris" in full.text
    assert "<|im_end|>" not in full.text
    assert full.finish_reason == "stop"
    assert full.prompt_tokens == short.prompt_tokens == tokenizer.count(prompt)
    assert full.completion_tokens == tokenizer.count(full.text)
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert full.text.startswith(short.text)


def test_an_answer_is_cut_at_the_stop_sequence_complete_first() -> None:
    """As a model writes from left to right: the one whose end comes first."""
    assert stop_index("1, 2, 3, 4", ["3", "2,"]) == 3
    assert stop_index("abcd", ["abcd", "c"]) == 2
    assert stop_index("abcd", ["b", "bc"]) == 1
    assert stop_index("abcd", ["x"]) is None and stop_index("abcd", []) is None


def test_a_row_stops_once_its_newest_tokens_hold_its_stop_sequence() -> None:
    """Each row of a static batch is ended by its own stop sequences, past its prompt."""
    import torch

    from workers.engines.hf import StopSequences
    from workers.engines.tiny import ByteTokenizer

    rows = [b"> hello wo", b"> hello!!!", b"o whatever", b"> o w     "]
    stops = [("o w",), ("o w",), (), ("zz", "o w")]
    criteria = StopSequences(ByteTokenizer(), stops, width=2)
    ids = torch.tensor([list(row) for row in rows])
    assert criteria(ids, None).tolist() == [True, False, False, True]
    # The prompt's own text never stops a row.
    prompt_only = StopSequences(ByteTokenizer(), [("o w",)], width=3)
    assert prompt_only(torch.tensor([list(b"o w")]), None).tolist() == [False]


async def test_smollm2_ends_an_answer_before_its_stop_sequence(smol: Engine) -> None:
    tokenizer = load_tokenizer("smollm2", Settings())
    request = ask(smol, COUNT, 40)
    full, five, either = await smol.generate(
        [request, replace(request, stop=("5",)), replace(request, stop=("7", "4,"))]
    )
    assert full.text.startswith("1, 2, 3, 4, 5, 6, 7"), full.text  # what the cuts rely on
    assert (five.text, five.finish_reason) == ("1, 2, 3, 4, ", "stop")
    assert (either.text, either.finish_reason) == ("1, 2, 3, ", "stop")
    # The tokens made are counted, the stop sequence's too: up to the one that completed it.
    ids = tokenizer.encode(full.text)
    made = next(n for n in range(1, len(ids) + 1) if "5" in tokenizer.decode(ids[:n]))
    assert five.completion_tokens == made < full.completion_tokens
    assert five.prompt_tokens == full.prompt_tokens


def test_each_tokens_bytes_join_into_the_text_special_tokens_left_out() -> None:
    from workers.engines.hf import HFTokenizer
    from workers.engines.tiny import ByteTokenizer

    smol = load_tokenizer("smollm2", Settings())
    assert isinstance(smol, HFTokenizer)
    for tokenizer in (smol, ByteTokenizer()):
        ids = [*tokenizer.encode("Hi café ☕, 3 \u00d7 4"), tokenizer.eos_id]
        spelled = tokenizer.token_bytes(ids)
        assert len(spelled) == len(ids) and spelled[-1] == b""
        assert b"".join(spelled).decode() == tokenizer.decode(ids) == "Hi café ☕, 3 \u00d7 4"


async def test_smollm2_gives_each_tokens_log_probability_when_asked(smol: Engine) -> None:
    request = ask(smol, COUNT, 12)
    plain, scored, stopped = await smol.generate(
        [request, replace(request, logprobs=True), replace(request, logprobs=True, stop=("3",))]
    )
    assert plain.tokens is None
    assert scored.text == plain.text and scored.tokens is not None
    assert len(scored.tokens) == scored.completion_tokens
    assert b"".join(t.bytes for t in scored.tokens).decode() == scored.text
    assert all(t.logprob <= 0 for t in scored.tokens)
    mean = sum(t.logprob for t in scored.tokens) / len(scored.tokens)
    assert mean == pytest.approx(scored.mean_logprob)
    # A stop sequence's tokens were made, and are listed: past the answer's text.
    assert stopped.text == "1, 2, " and stopped.tokens is not None
    assert len(stopped.tokens) == stopped.completion_tokens
    assert b"".join(t.bytes for t in stopped.tokens).decode() == "1, 2, 3"


def test_failed_conversion_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    settings = Settings(model_cache_dir=tmp_path)
    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2.ensure_cache(settings)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2.lock"]

    (tmp_path / ".smollm2-stale").mkdir()  # as a SIGKILLed conversion leaves it
    monkeypatch.setattr(smollm2, "_convert", lambda out: (out / "config.json").write_text("{}"))
    path = smollm2.ensure_cache(settings)
    assert [p.name for p in path.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2", "smollm2.lock"]


def test_concurrent_first_loads_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def slow_convert(out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_convert", slow_convert)
    settings = Settings(model_cache_dir=tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(smollm2.ensure_cache(settings)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "smollm2"] * 2


def test_the_device_setting_resolves_against_this_machine() -> None:
    import torch

    from workers.engines import device

    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.device(Settings(device="auto")) == here
    assert device.device(Settings(device="cpu")) == "cpu"
    # bfloat16 only where the CPU multiplies it in hardware (AMX), float32 elsewhere
    assert device.dtype(Settings(), "cpu") == (torch.bfloat16 if device.amx() else torch.float32)
    assert device.dtype(Settings(torch_dtype="float32"), "cpu") == torch.float32
    assert device.dtype(Settings(), "cuda") == torch.bfloat16
    assert device.dtype(Settings(torch_dtype="float16"), "cuda") == torch.float16
    if here == "cpu":
        with pytest.raises(RuntimeError, match="KONTEXT_DEVICE=cuda"):
            device.device(Settings(device="cuda"))


def test_smollm2_runs_where_the_device_setting_says(smol: Engine) -> None:
    import torch

    model = smol.model  # type: ignore[attr-defined]
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert smol.device == here  # type: ignore[attr-defined]
    assert next(model.parameters()).device.type == here


async def test_the_null_engine_reports_the_enrichers_count_of_a_prompt_or_its_own() -> None:
    engine = await load_engine("null", Settings())
    prompt = "<|user|>\nfour words right here\n<|assistant|>\n"
    counted, uncounted = await engine.generate(
        [GenerationRequest(prompt, 4, prompt_tokens=11), GenerationRequest(prompt, 4)]
    )
    assert counted.prompt_tokens == 11  # the enricher's count, the prompt not split again
    assert uncounted.prompt_tokens == engine.tokenizer.count(prompt) == 6
