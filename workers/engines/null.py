"""``null``: no model at all, for measuring the pipeline's own overhead.

Every prompt gets the same short reply at once; tokens are whitespace-separated
words. Its answers carry no meaning: use it only to measure the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

from kontext.settings import Settings
from workers.engines.base import (
    Generation,
    GenerationRequest,
    Message,
    ScoredToken,
    stop_index,
)

CONTEXT_WINDOW = 8192
SYSTEM_PROMPT = "You are a helpful assistant."
REPLY = "ok"


class WordTokenizer:
    """Counts whitespace-separated words; a plain-text chat template."""

    def render(self, messages: Sequence[Message]) -> str:
        turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
        return f"{turns}<|assistant|>\n"

    def count(self, text: str) -> int:
        return len(text.split())


class NullEngine:
    """Answers every request with ``REPLY`` without running anything."""

    name = "null"
    context_window = CONTEXT_WINDOW

    def __init__(self) -> None:
        self.tokenizer = WordTokenizer()
        self._reply_tokens = self.tokenizer.count(REPLY)

    async def generate(self, batch: Sequence[GenerationRequest]) -> list[Generation]:
        return [self._answer(request) for request in batch]

    def _answer(self, request: GenerationRequest) -> Generation:
        text = REPLY if (cut := stop_index(REPLY, request.stop)) is None else REPLY[:cut]
        return Generation(
            text=text,
            prompt_tokens=request.prompt_tokens
            if request.prompt_tokens is not None
            else self.tokenizer.count(request.prompt),
            completion_tokens=self._reply_tokens,
            finish_reason="stop",
            mean_logprob=0.0,  # a fixed reply: probability 1
            tokens=tuple(ScoredToken(w.encode(), 0.0) for w in text.split())
            if request.logprobs
            else None,
        )

    async def forget_prefixes(self) -> None:
        """Nothing kept."""

    async def close(self) -> None:
        """Nothing to release."""


def load_tokenizer(settings: Settings) -> WordTokenizer:
    return WordTokenizer()


def load_engine(settings: Settings) -> NullEngine:
    return NullEngine()
