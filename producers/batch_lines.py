"""Validating an OpenAI Batch input file, line by line, into background job requests.

Each line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body"}``; the body passes the same checks as ``POST /v1/jobs``. A bad line is
reported with its 1-based line number and the reason; the good ones still run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from kontext.settings import Settings
from producers.submit import SubmissionRejected, to_request
from schemas.api import JobSubmission, storable
from schemas.batches import ENDPOINT, LineError, jsonl_lines
from schemas.events import JobRequest

LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID = 512
# Body fields of POST /v1/jobs a line may carry; max_completion_tokens is OpenAI's newer
# name for max_tokens. Kontext's conversation_id continues (or names) a conversation.
ACCEPTED = frozenset(JobSubmission.model_fields) - {"idempotency_key", "webhook"}
# Accepted and ignored: they do not change what the engine produces.
IGNORED = frozenset({"store", "service_tier", "seed"})
# Accepted only at OpenAI's default, which is what Kontext does; any other value is refused.
DEFAULT_ONLY: dict[str, object] = {
    "n": 1,
    "stream": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "top_logprobs": 0,
}


class LineRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ParsedInput:
    """The lines of an input file: good ones as requests, bad ones as errors."""

    sha256: str
    total: int = 0
    good: list[tuple[str, JobRequest]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)


def _submission(body: dict[str, Any]) -> JobSubmission:
    fields: dict[str, Any] = {}
    for name, value in body.items():
        if name == "max_completion_tokens":
            name = "max_tokens"
        if name in ACCEPTED:
            if name in fields:
                raise LineRefused("invalid_body", "give max_tokens or max_completion_tokens")
            fields[name] = value
        elif name in DEFAULT_ONLY:
            default = DEFAULT_ONLY[name]
            if value != default or isinstance(value, bool) != isinstance(default, bool):
                raise LineRefused("unsupported_value", f"{name} must be {default!r} (or omitted)")
        elif name in ("idempotency_key", "webhook"):
            raise LineRefused("unsupported_field", f"{name} is set per batch, not per line")
        elif name not in IGNORED:
            raise LineRefused("unsupported_field", f"body.{name} is not supported")
    try:
        return JobSubmission.model_validate(fields)
    except ValidationError as exc:
        reasons = "; ".join(
            f"body.{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise LineRefused("invalid_request", reasons) from None


def _custom_id(line: object) -> str | None:
    """The line's custom_id, when it is a string Postgres can hold."""
    if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
        try:
            storable(line["custom_id"], "custom_id")
        except ValueError:
            return None
        return str(line["custom_id"])
    return None


def _storable_text(text: str) -> str:
    """A message naming the line's own keys as Postgres can hold it (NUL escaped)."""
    return text.replace("\x00", "\\u0000")


def _request(settings: Settings, line: object) -> tuple[str, JobRequest]:
    if not isinstance(line, dict):
        raise LineRefused("invalid_line", "a line must be a JSON object")
    custom_id = _custom_id(line)
    if not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise LineRefused(
            "invalid_custom_id",
            f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters, without NUL",
        )
    unknown = sorted(set(line) - LINE_KEYS)
    if unknown:
        raise LineRefused("invalid_line", f"unknown fields: {', '.join(unknown)}")
    if line.get("method") != "POST":
        raise LineRefused("invalid_method", "method must be POST")
    if line.get("url") != ENDPOINT:
        raise LineRefused("invalid_url", f"url must be {ENDPOINT}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise LineRefused("invalid_body", "body must be a JSON object")
    try:
        request = to_request(settings, _submission(body))
    except SubmissionRejected as exc:
        raise LineRefused(exc.code, exc.message) from None
    return custom_id, request.model_copy(update={"priority": "background"})


def parse(settings: Settings, text: str) -> ParsedInput:
    """Validate every non-blank line; a repeated custom_id is refused after its first line."""
    parsed = ParsedInput(sha256=hashlib.sha256(text.encode()).hexdigest())
    seen: set[str] = set()
    for number, raw in enumerate(jsonl_lines(text), 1):
        if not raw.strip():
            continue
        parsed.total += 1
        line: object = None
        try:
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise LineRefused("invalid_json", f"not valid JSON: {exc}") from None
            custom_id, request = _request(settings, line)
            if custom_id in seen:
                raise LineRefused("duplicate_custom_id", f"custom_id {custom_id!r} is repeated")
        except LineRefused as exc:
            parsed.errors.append(
                LineError(
                    code=exc.code,
                    message=_storable_text(exc.message),
                    line=number,
                    custom_id=_custom_id(line),
                )
            )
            continue
        seen.add(custom_id)
        parsed.good.append((custom_id, request))
    return parsed
