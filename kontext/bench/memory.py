"""``kontext bench-memory``: conversations grown to 10/20/40 turns through the
whole pipeline (memory assembled server-side) against naive full-history
resend to the same engine, with a fact planted in turn 1 and asked for in the
last turn.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kontext.app import report
from producers.client import KontextClient
from schemas.events import ChatMessage
from workers.context import truncate
from workers.engines.base import ChatTokenizer, Engine, GenerationRequest

FACT = "Please remember: my locker code is {code}."
QUESTION = "What is my locker code?"
FILLER = (
    "I spent the morning walking along the river with a friend.",
    "We talked about which films are worth seeing this season.",
    "The weather turned grey, so we went looking for a quiet cafe.",
    "They recommended a book about mountain villages and old roads.",
    "Later we argued gently about the best way to cook rice.",
    "In the evening I tidied the kitchen and listened to some jazz.",
)


def script(turns: int, code: str) -> list[str]:
    """The user's messages: the fact, filler, then the question."""
    middle = [FILLER[i % len(FILLER)] for i in range(turns - 2)]
    return [FACT.format(code=code), *middle, QUESTION]


@dataclass
class Row:
    mode: str
    turns: int
    mean_prompt_tokens: float
    last_prompt_tokens: int
    turns_per_s: float
    recalled: int
    conversations: int


async def kontext_run(
    client: KontextClient, model: str, turns: int, runs: int, max_tokens: int
) -> Row:
    prompt_tokens: list[int] = []
    recalled = 0
    started = time.perf_counter()
    last = 0
    for run in range(runs):
        code = f"{4000 + 97 * run + turns}"
        conversation = f"bench-{uuid.uuid4().hex[:10]}"
        for index, text in enumerate(script(turns, code)):
            is_last = index == turns - 1
            reply = await client.chat(
                model=model,
                conversation_id=conversation,
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                include_prompt=is_last,
                timeout=300,
            )
            if reply.result is None or reply.result.context is None:
                raise RuntimeError(f"turn failed: {reply.error}")
            context = reply.result.context
            prompt_tokens.append(context.prompt_tokens)
            if is_last:
                last = context.prompt_tokens
                recalled += int(code in (context.prompt or ""))
    elapsed = time.perf_counter() - started
    return Row(
        "kontext",
        turns,
        statistics.mean(prompt_tokens),
        last,
        turns * runs / elapsed,
        recalled,
        runs,
    )


def resend_prompt(tokenizer: ChatTokenizer, history: list[ChatMessage], budget: int) -> str:
    """What a client without server-side memory sends: the whole history (a system
    message first), its oldest turns dropped until it fits ``budget`` tokens, and a
    new message that alone does not fit cut as the pipeline cuts one. ``history`` is
    cut in place."""
    prompt = tokenizer.render(history)
    while tokenizer.count(prompt) > budget and len(history) > 2:
        del history[1]
        prompt = tokenizer.render(history)
    if tokenizer.count(prompt) > budget:
        history[1:] = truncate(tokenizer, history[0].content, history[1:], budget)
        prompt = tokenizer.render(history)
    return prompt


async def naive_run(engine: Engine, turns: int, runs: int, max_tokens: int) -> Row:
    """Full history resent every turn, straight to the engine (no pipeline, no memory)."""
    prompt_tokens: list[int] = []
    recalled = 0
    last = 0
    started = time.perf_counter()
    budget = engine.context_window - max_tokens
    for run in range(runs):
        code = f"{4000 + 97 * run + turns}"
        history = [ChatMessage(role="system", content="You are a helpful assistant.")]
        for index, text in enumerate(script(turns, code)):
            history.append(ChatMessage(role="user", content=text))
            prompt = resend_prompt(engine.tokenizer, history, budget)
            tokens = engine.tokenizer.count(prompt)
            prompt_tokens.append(tokens)
            [answer] = await engine.generate([GenerationRequest(prompt, max_tokens)])
            history.append(ChatMessage(role="assistant", content=answer.text))
            if index == turns - 1:
                last = tokens
                recalled += int(code in prompt)
    elapsed = time.perf_counter() - started
    return Row(
        "naive resend",
        turns,
        statistics.mean(prompt_tokens),
        last,
        turns * runs / elapsed,
        recalled,
        runs,
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| mode | turns | mean prompt tokens/turn | last-turn prompt tokens | turns/s "
        "| planted fact in last prompt |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.turns} | {r.mean_prompt_tokens:.0f} | {r.last_prompt_tokens} | "
            f"{r.turns_per_s:.2f} | {r.recalled}/{r.conversations} |"
        )
    return "\n".join(lines)


DOC = Path("docs/benchmarks.md")


def record(title: str, setup: str, body: str, path: Path = DOC) -> None:
    """Append a dated section to docs/benchmarks.md."""
    heading = "# Benchmarks\n\nFigures measured by the project's own benchmark commands.\n"
    report.append(path, heading, title, setup, body)
