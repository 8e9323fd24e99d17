"""Events the tests build by hand, with the fields they rarely vary filled in."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from schemas.events import ChatMessage, JobRequest
from workers.engines.base import Engine, GenerationRequest


def job_request(content: str = "hi", **fields: Any) -> JobRequest:
    """A chat job of one user message: a fresh job id and conversation, model ``tiny``,
    8 tokens; ``fields`` override any of them (or set others: priority, tenant...)."""
    values: dict[str, Any] = {
        "job_id": uuid.uuid4(),
        "conversation_id": f"c-{uuid.uuid4().hex[:8]}",
        "model": "tiny",
        "messages": [ChatMessage(role="user", content=content)],
        "max_tokens": 8,
    }
    values.update(fields)
    return JobRequest(**values)


def ask(engine: Engine, text: str, max_tokens: int, temperature: float = 0.0) -> GenerationRequest:
    """A request of one user message in the engine's own chat template."""
    prompt = engine.tokenizer.render([ChatMessage(role="user", content=text)])
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature)


def batch_line(custom_id: str, content: str = "ping", **body: Any) -> dict[str, Any]:
    """One OpenAI Batch input line: a chat request to model ``tiny`` for 1 token;
    ``body`` overrides or adds request fields."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 1,
            **body,
        },
    }


def jsonl(lines: list[Any]) -> str:
    """Lines as a JSONL text: objects serialised, strings kept as they are."""
    return "".join(
        (line if isinstance(line, str) else orjson.dumps(line).decode()) + "\n" for line in lines
    )
