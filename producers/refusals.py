"""Why a submission was refused, as an answer every intake gives alike.

The HTTP API, the OpenAI-compatible routes and the Kafka submissions topic all
turn the same exceptions into the same status and error body (OpenAI's shape:
``code``, ``message``, ``type``, ``param``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producers.submit import SubmissionRejected
from schemas.api import ApiError, error_type
from workers.intake import EnqueueFailed
from workers.policies.base import Refused

REJECTED_STATUS = {
    "unknown_model": 400,
    "idempotency_key_reused": 409,
    "conversation_not_found": 404,
}
"""The status of a SubmissionRejected by its code (422 otherwise)."""


@dataclass(frozen=True)
class Answer:
    """An error answer: its HTTP status, body and, when known, seconds to wait."""

    status: int
    error: ApiError
    retry_after_s: float | None = None


def _error(status: int, code: str, message: str, **extra: object) -> ApiError:
    return ApiError.model_validate(
        {"code": code, "message": message, "type": error_type(status), **extra}
    )


def invalid(errors: Iterable[Mapping[str, Any]]) -> Answer:
    """A body that failed validation (422), its fields listed; ``errors`` as pydantic
    (or FastAPI, whose ``body`` part of a location is dropped) lists them."""
    details = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
            "message": e.get("msg"),
            "type": e.get("type"),
        }
        for e in errors
    ]
    if any(d["type"] == "json_invalid" for d in details):
        return Answer(400, _error(400, "malformed_json", "the body is not valid JSON"))
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    first = str(details[0]["field"]) if details else None
    return Answer(422, _error(422, "invalid_request", summary, details=details, param=first))


def answer_for(exc: BaseException) -> Answer | None:
    """The answer for a refused submission, or None when ``exc`` is not a refusal."""
    if isinstance(exc, SubmissionRejected):
        status = REJECTED_STATUS.get(exc.code, 422)
        return Answer(
            status, _error(status, exc.code, exc.message, served_models=exc.served_models)
        )
    if isinstance(exc, Refused):
        r = exc.refusal
        return Answer(r.status, _error(r.status, r.code, r.message), r.retry_after_s)
    if isinstance(exc, EnqueueFailed):
        return Answer(
            503, _error(503, "queue_unavailable", "the job could not be queued; try again"), 5.0
        )
    if isinstance(exc, ValidationError):
        return invalid(exc.errors(include_url=False, include_input=False))
    return None
