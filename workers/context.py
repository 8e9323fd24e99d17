"""Prompt assembly: a request plus its conversation's stored turns, within the model's window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kontext.ledger import StoredTurn
from schemas.events import ChatMessage, ContextInfo, JobRequest, TurnRecord
from workers.engines.base import ChatTokenizer

SAFETY_MARGIN_TOKENS = 8


class PromptTooLong(ValueError):
    """The new messages alone do not fit the model's window."""


@dataclass(frozen=True)
class Assembled:
    prompt: str
    context: ContextInfo
    new_turns: list[TurnRecord]


def assemble(
    request: JobRequest,
    history: Sequence[StoredTurn],
    tokenizer: ChatTokenizer,
    context_window: int,
    default_system_prompt: str,
) -> Assembled:
    """System prompt + as many recent turns as fit + the new messages.

    The budget is the context window minus the reply's max_tokens and a small
    margin; the oldest turns are dropped first.
    """
    system = [m for m in request.messages if m.role == "system"] or [
        ChatMessage(role="system", content=default_system_prompt)
    ]
    new = [m for m in request.messages if m.role != "system"]
    budget = context_window - request.max_tokens - SAFETY_MARGIN_TOKENS
    kept = list(history)
    while True:
        stored = [ChatMessage(role=t.role, content=t.content) for t in kept]
        messages = [*system, *stored, *new]
        prompt = tokenizer.render(messages)
        tokens = tokenizer.count(prompt)
        if tokens <= budget:
            break
        if not kept:
            raise PromptTooLong(
                f"the messages take {tokens} tokens; this model allows {budget} "
                f"with max_tokens={request.max_tokens}"
            )
        kept.pop(0)
    return Assembled(
        prompt=prompt,
        context=ContextInfo(
            prompt_tokens=tokens,
            turns=[t.seq for t in kept],
            prompt=prompt if request.include_prompt else None,
        ),
        new_turns=[
            TurnRecord(role=m.role, content=m.content, tokens=tokenizer.count(m.content))
            for m in new
        ],
    )
