"""Summaries of conversation history: a deterministic extractive summariser, and
the summary job the model writes through the pipeline."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence

from schemas.events import ChatMessage, JobRequest

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
FIRST_PERSON = re.compile(r"\b(my|mine|i am|i'm|i live|i work|i have|call me|name)\b", re.I)
SUMMARY_INSTRUCTIONS = (
    "Summarise the conversation below in a few short sentences. Keep every name, number, "
    "date, place, and each fact or preference the user stated about themselves."
)

Line = tuple[str, str]
"""(speaker, text): a turn (user/assistant) or an earlier summary ("summary")."""


def extractive_summary(lines: Sequence[Line], max_tokens: int, count: Callable[[str], int]) -> str:
    """The most informative sentences, in their original order, within ``max_tokens``.

    Sentences score for digits, first-person facts, capitalised words and for
    coming from the user; the same input always gives the same summary.
    """
    candidates: list[tuple[float, int, int, str]] = []
    for line_no, (speaker, text) in enumerate(lines):
        for sentence_no, raw in enumerate(SENTENCE_BREAK.split(text)):
            sentence = raw.strip()
            words = sentence.split()
            if len(words) < 3:
                continue
            score = 0.0
            if any(ch.isdigit() for ch in sentence):
                score += 3
            if FIRST_PERSON.search(sentence):
                score += 2
            score += min(3, sum(1 for w in words[1:] if w[:1].isupper()))
            score += {"user": 1.0, "summary": 1.5}.get(speaker, 0.0)
            shown = sentence if speaker == "summary" else f"{speaker}: {sentence}"
            candidates.append((score, line_no, sentence_no, shown))
    chosen: list[tuple[float, int, int, str]] = []
    used = 0
    for candidate in sorted(candidates, key=lambda c: (-c[0], c[1], c[2])):
        cost = count(candidate[3]) + 1
        if used + cost <= max_tokens:
            chosen.append(candidate)
            used += cost
    return "\n".join(c[3] for c in sorted(chosen, key=lambda c: (c[1], c[2])))


def transcript(lines: Sequence[Line]) -> str:
    return "\n".join(
        text if speaker == "summary" else f"{speaker}: {text}" for speaker, text in lines
    )


def summary_job(
    conversation_id: str,
    model: str,
    level: int,
    first_seq: int,
    last_seq: int,
    lines: Sequence[Line],
    max_tokens: int,
) -> JobRequest:
    """A low-priority job in which the model summarises ``lines`` (turns or summaries)."""
    return JobRequest(
        job_id=uuid.uuid4(),
        conversation_id=conversation_id,
        model=model,
        kind="summary",
        priority="background",
        messages=[
            ChatMessage(role="system", content=SUMMARY_INSTRUCTIONS),
            ChatMessage(role="user", content=transcript(lines)),
        ],
        max_tokens=max_tokens,
        metadata={"summary": {"level": level, "first_seq": first_seq, "last_seq": last_seq}},
    )
