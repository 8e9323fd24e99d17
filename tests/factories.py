"""Events the tests build by hand, with the fields they rarely vary filled in."""

from __future__ import annotations

import uuid
from typing import Any

from schemas.events import ChatMessage, JobRequest


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
