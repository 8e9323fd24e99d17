"""Prompt assembly under a token budget (property-based, with the byte-level tokenizer)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kontext.store.memory import MemoryContext, StoredSummary, StoredTurn
from tests.factories import job_request
from workers.context import TRUNCATION_MARKER, assemble
from workers.engines.tiny import ByteTokenizer

TOKENIZER = ByteTokenizer()
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=300)


@st.composite
def memories(draw: st.DrawFn) -> MemoryContext:
    contents = draw(st.lists(text, max_size=30))
    recent = [
        StoredTurn(
            seq=i + 1,
            role="user" if i % 2 == 0 else "assistant",
            content=c,
            tokens=TOKENIZER.count(c),
            similarity=draw(st.one_of(st.none(), st.floats(-1, 1))),
        )
        for i, c in enumerate(contents)
    ]
    summaries = [
        StoredSummary(
            level=1,
            first_seq=i * 10 + 1,
            last_seq=i * 10 + 10,
            content=c,
            tokens=TOKENIZER.count(c),
        )
        for i, c in enumerate(draw(st.lists(text, max_size=4)))
    ]
    recalled = [
        StoredTurn(seq=100 + i, role="user", content=c, tokens=TOKENIZER.count(c), similarity=0.5)
        for i, c in enumerate(draw(st.lists(text, max_size=4)))
    ]
    return MemoryContext(recent=recent, summaries=summaries, recalled=recalled)


@settings(max_examples=300, deadline=None)
@given(memory=memories(), new=text, budget=st.integers(200, 2000))
def test_prompt_fits_the_budget_and_ends_with_the_new_message(
    memory: MemoryContext, new: str, budget: int
) -> None:
    request = job_request(new, conversation_id="c", max_tokens=16)
    assembled = assemble(request, memory, TOKENIZER, budget, "You are helpful.")
    prompt = assembled.prompt
    assert TOKENIZER.count(prompt) <= budget
    assert assembled.context.prompt_tokens == TOKENIZER.count(prompt)
    last = prompt[prompt.rindex("<|user|>\n") + len("<|user|>\n") : -len("\n<|assistant|>\n")]
    assert prompt.endswith("\n<|assistant|>\n")
    if assembled.context.truncated:
        head, tail = last.split(TRUNCATION_MARKER)
        assert new.startswith(head) and new.endswith(tail)
    else:
        assert last == new
    # Whatever was kept is reported, and recent turns stay in order.
    kept = assembled.context.turns
    assert kept == sorted(kept)
    assert set(kept) <= {t.seq for t in memory.recent}


def test_the_latest_exchange_is_kept_before_older_turns() -> None:
    turns = [
        StoredTurn(
            seq=i, role="user" if i % 2 else "assistant", content=f"turn {i} " * 8, tokens=64
        )
        for i in range(1, 11)
    ]
    request = job_request("and now?", conversation_id="c", max_tokens=16)
    assembled = assemble(request, MemoryContext(recent=turns), TOKENIZER, 300, "Hi.")
    assert assembled.context.turns[-2:] == [9, 10]
    assert 1 not in assembled.context.turns
