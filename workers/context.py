"""Prompt assembly: a request plus its conversation's memory, within a token budget.

The prompt is the system prompt (with the summary chain and recalled older
turns folded into it), then as many recent turns as fit, then the new
messages. When the pieces do not all fit, the least valuable go first; value
grows with recency and with similarity to the new message. Only a new message
that alone exceeds the budget is cut, with a visible marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kontext.store.memory import MemoryContext, StoredSummary, StoredTurn
from schemas.events import ChatMessage, ContextInfo, JobRequest, MemoryRef, SummaryRef, TurnRecord
from workers.engines.base import ChatTokenizer, Message

SAFETY_MARGIN_TOKENS = 8
TRUNCATION_MARKER = " […truncated to fit the context window…] "
MESSAGE_OVERHEAD_TOKENS = 6
"""Rough per-message cost of the chat template; the final count is exact."""
RECENCY_WEIGHT = 0.6
SIMILARITY_WEIGHT = 0.4
SUMMARY_VALUE = 0.75
LAST_EXCHANGE_VALUE = 2.0
"""The latest two turns beat everything else: answers must follow the thread."""
COVERED_PENALTY = 0.3
"""A recent turn already inside a summary is worth less."""


class PromptTooLong(ValueError):
    """Even the system prompt and a truncated new message do not fit."""


@dataclass(frozen=True)
class Assembled:
    prompt: str
    context: ContextInfo
    new_turns: list[TurnRecord]


@dataclass(slots=True)
class _Piece:
    kind: str  # "recent" | "summary" | "recall"
    value: float
    cost: int
    turn: StoredTurn | None = None
    summary: StoredSummary | None = None


def budget_for(request: JobRequest, context_window: int, cap: int | None) -> int:
    """Prompt tokens allowed: the window minus the reply and a margin, at most ``cap``."""
    budget = context_window - request.max_tokens - SAFETY_MARGIN_TOKENS
    return min(budget, cap) if cap is not None else budget


def _pieces(memory: MemoryContext) -> list[_Piece]:
    covered = max((s.last_seq for s in memory.summaries), default=0)
    pieces: list[_Piece] = []
    count = len(memory.recent)
    for index, turn in enumerate(memory.recent):
        if index >= count - 2:
            value = LAST_EXCHANGE_VALUE
        else:
            recency = (index + 1) / count
            value = RECENCY_WEIGHT * recency + SIMILARITY_WEIGHT * (turn.similarity or 0.0)
            if turn.seq <= covered:
                value -= COVERED_PENALTY
        pieces.append(_Piece("recent", value, turn.tokens + MESSAGE_OVERHEAD_TOKENS, turn=turn))
    for summary in memory.summaries:
        pieces.append(
            _Piece(
                "summary", SUMMARY_VALUE + 0.05 * summary.level, summary.tokens + 4, summary=summary
            )
        )
    for turn in memory.recalled:  # older than the recent turns, by construction
        value = SIMILARITY_WEIGHT * 2 * (turn.similarity or 0.0)
        pieces.append(_Piece("recall", value, turn.tokens + 4, turn=turn))
    return pieces


def _system_text(base: str, kept: Sequence[_Piece]) -> str:
    summaries = sorted(
        (p.summary for p in kept if p.summary is not None), key=lambda s: (s.first_seq, s.level)
    )
    recalled = sorted(
        (p.turn for p in kept if p.kind == "recall" and p.turn is not None),
        key=lambda t: (t.conversation_id or "", t.seq),
    )
    text = base
    if summaries:
        text += "\n\nSummary of the earlier conversation:\n" + "\n".join(
            s.content for s in summaries
        )
    if recalled:
        text += "\n\nEarlier messages that may be relevant:\n" + "\n".join(
            f"{t.role}: {t.content}" for t in recalled
        )
    return text


def _render(
    tokenizer: ChatTokenizer, base: str, kept: Sequence[_Piece], new: Sequence[ChatMessage]
) -> tuple[str, int]:
    recent = sorted(
        (p.turn for p in kept if p.kind == "recent" and p.turn is not None), key=lambda t: t.seq
    )
    messages: list[Message] = [ChatMessage(role="system", content=_system_text(base, kept))]
    messages += recent
    messages += new
    prompt = tokenizer.render(messages)
    return prompt, tokenizer.count(prompt)


def truncate(
    tokenizer: ChatTokenizer, base: str, new: list[ChatMessage], budget: int
) -> list[ChatMessage]:
    """Cut the longest new message (head and tail kept, marker between) until all fit."""
    longest = max(range(len(new)), key=lambda i: len(new[i].content))
    content = new[longest].content
    low, high = 0, len(content)
    best: list[ChatMessage] | None = None
    while low <= high:
        keep = (low + high) // 2
        head, tail = content[: keep - keep // 2], content[len(content) - keep // 2 :]
        trial = list(new)
        trial[longest] = ChatMessage(
            role=new[longest].role, content=head + TRUNCATION_MARKER + tail
        )
        if _render(tokenizer, base, [], trial)[1] <= budget:
            best, low = trial, keep + 1
        else:
            high = keep - 1
    if best is None:
        raise PromptTooLong(f"the prompt does not fit in {budget} tokens even with the message cut")
    return best


def assemble(
    request: JobRequest,
    memory: MemoryContext,
    tokenizer: ChatTokenizer,
    budget: int,
    default_system_prompt: str,
) -> Assembled:
    """The prompt for ``request``: never over ``budget`` tokens, always ending with
    the new messages."""
    system = [m.content for m in request.messages if m.role == "system"]
    base = "\n\n".join(system) if system else default_system_prompt
    new = [m for m in request.messages if m.role != "system"]
    new_turns = [
        TurnRecord(role=m.role, content=m.content, tokens=tokenizer.count(m.content)) for m in new
    ]

    # The new messages alone: rendered and counted only when they may not fit (a
    # message over half the budget); else their counts and the template's overhead
    # stand in, and the final render below counts exactly.
    tokens = tokenizer.count(base) + sum(t.tokens for t in new_turns)
    tokens += MESSAGE_OVERHEAD_TOKENS * (len(new) + 2)
    truncated = False
    if tokens > budget // 2:
        prompt, tokens = _render(tokenizer, base, [], new)
        truncated = tokens > budget
        if truncated:
            new = truncate(tokenizer, base, new, budget)
            prompt, tokens = _render(tokenizer, base, [], new)

    kept: list[_Piece] = []
    spent = tokens
    for piece in sorted(_pieces(memory), key=lambda p: p.value, reverse=True):
        if spent + piece.cost <= budget:
            kept.append(piece)
            spent += piece.cost
    prompt, tokens = _render(tokenizer, base, kept, new)
    while tokens > budget and kept:
        kept.pop()  # the least valuable of those kept
        prompt, tokens = _render(tokenizer, base, kept, new)

    return Assembled(
        prompt=prompt,
        context=ContextInfo(
            prompt_tokens=tokens,
            budget_tokens=budget,
            turns=sorted(p.turn.seq for p in kept if p.kind == "recent" and p.turn is not None),
            summaries=[
                SummaryRef(level=s.level, first_seq=s.first_seq, last_seq=s.last_seq)
                for s in sorted(
                    (p.summary for p in kept if p.summary is not None), key=lambda s: s.first_seq
                )
            ],
            memories=[
                MemoryRef(
                    conversation_id=p.turn.conversation_id or request.conversation_id,
                    seq=p.turn.seq,
                    similarity=round(p.turn.similarity or 0.0, 4),
                )
                for p in kept
                if p.kind == "recall" and p.turn is not None
            ],
            truncated=truncated,
            prompt=prompt if request.include_prompt else None,
        ),
        new_turns=new_turns,
    )
