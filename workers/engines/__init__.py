"""The inference engines by name.

Each engine lives in its own module, imported on first use, so importing this
package stays cheap (no torch, no transformers).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Protocol, cast

from kontext.settings import Settings
from workers.engines.base import ChatTokenizer, Engine

ENGINE_NAMES: tuple[str, ...] = ("smollm2", "vllm", "tiny", "null")


class _Backend(Protocol):
    """What each engine module provides."""

    CONTEXT_WINDOW: int
    SYSTEM_PROMPT: str

    def load_engine(self, settings: Settings) -> Engine: ...

    def load_tokenizer(self, settings: Settings) -> ChatTokenizer: ...


def _backend(name: str) -> _Backend:
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(ENGINE_NAMES)}")
    return cast(_Backend, importlib.import_module(f"{__name__}.{name}"))


async def load_engine(name: str, settings: Settings) -> Engine:
    """Load an engine in a worker thread (smollm2 converts its weights on first use)."""
    return await asyncio.to_thread(_backend(name).load_engine, settings)


def load_tokenizer(name: str, settings: Settings) -> ChatTokenizer:
    """The engine's chat template and token counter, without its weights."""
    return _backend(name).load_tokenizer(settings)


def context_window(name: str) -> int:
    """Most tokens a prompt plus its reply may take under this engine."""
    return _backend(name).CONTEXT_WINDOW


def concurrent_batches(name: str, settings: Settings) -> int:
    """Micro-batches the engine is best given at once: its module's ``CONCURRENT_BATCHES``,
    or what its ``concurrent_batches(settings)`` says, or 1 (an engine that runs one
    batch at a time gains nothing from more)."""
    backend = _backend(name)
    by_settings = getattr(backend, "concurrent_batches", None)
    if by_settings is not None:
        return int(by_settings(settings))
    return int(getattr(backend, "CONCURRENT_BATCHES", 1))


def system_prompt(name: str) -> str:
    """The system prompt the model works best with, used when neither the request nor
    KONTEXT_SYSTEM_PROMPT gives one."""
    return _backend(name).SYSTEM_PROMPT
