"""The small interface every inference engine implements."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already rendered with the model's chat template."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    """Nucleus sampling at temperatures above 0: the smallest set of likeliest tokens
    whose probabilities reach ``top_p`` is sampled from (1: every token)."""
    stop: tuple[str, ...] = ()
    """Stop sequences: the answer ends before the first of them it produces."""
    logprobs: bool = False
    """Return each generated token with its log-probability (``Generation.tokens``)."""
    prompt_tokens: int | None = None
    """The prompt's length under the model's tokenizer, when the enricher counted it:
    what an engine that never tokenizes (``null``) reports."""
    background: bool = False
    """A background job's (a batch line's): an engine that schedules by priority
    (``vllm``) runs waiting interactive requests first."""


@dataclass(frozen=True)
class ScoredToken:
    """A generated token: its bytes (a character may span several tokens) and its
    log-probability under the model."""

    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    mean_logprob: float | None = field(default=None, compare=False)
    """Mean log-probability of the generated tokens under the model (None if unknown):
    how sure the model was; human review holds answers under a threshold. Not compared:
    padding in a batch moves it in the last digits."""
    tokens: tuple[ScoredToken, ...] | None = field(default=None, compare=False)
    """Each token of ``text`` (those of a stop sequence too), when the request asked for
    log-probabilities. Not compared, as ``mean_logprob``."""


def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where ``text`` is cut for its stop sequences: the start of the one that is
    complete first, as a model writes ``text`` from left to right (None: none is)."""
    ends = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return min(ends)[1] if ends else None


class Message(Protocol):
    """A chat message as a template reads it: a ``ChatMessage``, or a turn from memory
    as it is (no model built for each turn of each prompt)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


class ChatTokenizer(Protocol):
    """What the enricher needs of a model without loading its weights."""

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for these messages, ending where the assistant's reply begins."""
        ...

    def count(self, text: str) -> int:
        """Tokens in ``text`` under the model's own tokenizer."""
        ...


class Engine(Protocol):
    """A loaded model that answers a micro-batch of prompts in one call."""

    name: str
    context_window: int
    tokenizer: ChatTokenizer

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        """Answers in the order of ``batch``; never blocks the event loop."""
        ...

    async def forget_prefixes(self) -> None:
        """Drop the prompt prefixes kept from earlier calls for reuse, so that the next
        call computes its prompts in full (the bench's raw baselines each start cold).
        Call it between calls, not during one."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ContinuousEngine(Engine, Protocol):
    """An engine that batches continuously: its requests run in one batch, but each
    leaves it at its own end, so each answer can go out before the batch's last."""

    async def generate_each(
        self, batch: Sequence[GenerationRequest]
    ) -> list[asyncio.Task[Generation]]:
        """Start every request of ``batch``: a task per request, in the order of
        ``batch``, done when its own answer is; each fails alone. Await or cancel them."""
        ...
