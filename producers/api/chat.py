"""``POST /v1/chat/completions``: OpenAI's chat API over Kontext's jobs.

A request becomes a job through ``submit`` (the same admission, limits, memory,
ledger, usage and webhooks as ``POST /v1/jobs``); the answer waits for the job to
turn final (the long poll's LISTEN/NOTIFY wakeups) and is its ``chat.completion``,
or with ``stream`` the same as Server-Sent Events. A job still running after the
wait answers 504 with its id: it carries on, and ``GET /v1/jobs/{id}`` has it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from producers.api.auth import Caller
from producers.api.errors import error_response
from producers.api.jobs import read_job, submit_as
from producers.api.state import ApiState, state
from producers.refusals import answer_for
from producers.submit import SubmissionRejected
from schemas.api import CONVERSATION_ID_PATTERN, FINAL_STATUSES, ApiError, ErrorBody
from schemas.events import ChatCompletion
from schemas.openai import ChatCompletionRequest, chunks

router = APIRouter(tags=["openai"])

FAILED_STATUS = {
    "prompt_too_long": 400,
    "budget_exhausted": 402,
    "rate_limited": 429,
    "enqueue_failed": 503,
    "engine_error": 502,
}
"""The status of a failed job's answer by its error code (500 otherwise)."""

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody}
    for code in (400, 401, 402, 404, 409, 413, 422, 429, 500, 502, 503, 504)
}

STREAM = {
    "description": "a chat.completion, or with `stream` chat.completion.chunk events",
    "content": {"text/event-stream": {}},
}


def _refused(exc: BaseException) -> JSONResponse:
    """A refusal answered as every intake answers it (``producers.refusals``)."""
    answer = answer_for(exc)
    if answer is None:
        raise exc
    headers = None
    if answer.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(answer.retry_after_s)))}
    return error_response(answer.status, answer.error, headers=headers)


def _stream(completion: ChatCompletion, include_usage: bool, headers: dict[str, str]) -> Response:
    async def events() -> AsyncIterator[bytes]:
        for chunk in chunks(completion, include_usage):
            # ``finish_reason: null`` as OpenAI sends it; ``usage`` only on its own chunk.
            data = chunk.model_dump_json(exclude={"usage"} if chunk.usage is None else None)
            yield b"data: " + data.encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: STREAM, **ERRORS},
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    conversation: Annotated[
        str | None,
        Header(
            alias="X-Kontext-Conversation-Id",
            pattern=CONVERSATION_ID_PATTERN,
            description="continue this conversation (or the body's `conversation_id`)",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="the same key again waits on the same job instead of a new one",
        ),
    ] = None,
    wait: Annotated[
        float | None, Header(alias="X-Kontext-Wait", ge=0, include_in_schema=False)
    ] = None,
) -> Response:
    """An OpenAI chat completion, answered once its job is final.

    With a ``conversation_id`` (body, or the ``X-Kontext-Conversation-Id`` header)
    send only the new messages: the history is assembled from Kontext's memory.
    Without one the request is stateless: its messages are the whole prompt. The
    request waits at most ``KONTEXT_CHAT_WAIT_S`` (an ``X-Kontext-Wait: SECONDS``
    header may shorten it); then 504 with the job id, which ``GET /v1/jobs/{id}``
    answers when done.
    """
    refused = body.unsupported()
    if refused is not None:
        param, why = refused
        return error_response(
            400,
            ApiError(code="unsupported_parameter", message=f"{param}: {why}", param=param),
        )
    if conversation and body.conversation_id and conversation != body.conversation_id:
        return error_response(
            400,
            ApiError(
                code="conversation_id_conflict",
                message="the body's conversation_id and X-Kontext-Conversation-Id differ",
                param="conversation_id",
            ),
        )
    try:
        submission = body.submission(body.conversation_id or conversation, idempotency_key)
    except ValidationError as exc:
        return _refused(exc)
    try:
        job, _ = await submit_as(api, principal, submission)
    except SubmissionRejected as exc:
        if exc.code != "unknown_model":
            return _refused(exc)
        return error_response(
            404,
            ApiError(
                code="model_not_found",
                message=exc.message,
                param="model",
                served_models=exc.served_models,
            ),
        )

    headers = {"X-Kontext-Job-Id": str(job.id), "X-Kontext-Conversation-Id": job.conversation_id}
    limit = api.settings.chat_wait_s
    final = await read_job(
        api, job.id, principal.tenant_id, limit if wait is None else min(wait, limit)
    )
    if final is None:  # its conversation was forgotten meanwhile
        return error_response(
            404, ApiError(code="not_found", message=f"job {job.id} no longer exists")
        )
    if final.status not in FINAL_STATUSES:
        # Retrying would submit the job again, unless an idempotency key ties it to this one.
        retry = "true" if idempotency_key else "false"
        return error_response(
            504,
            ApiError(
                code="timeout",
                message=f"job {job.id} is still {final.status}; "
                f"GET /v1/jobs/{job.id}?wait=60 answers once it is done",
                details=[
                    {"job_id": str(job.id), "status": final.status, "url": f"/v1/jobs/{job.id}"}
                ],
            ),
            headers={**headers, "Location": f"/v1/jobs/{job.id}", "x-should-retry": retry},
        )
    if final.status == "failed" or final.result is None:
        error = final.error or {}
        code = str(error.get("code", "job_failed"))
        status = FAILED_STATUS.get(code, 500)
        return error_response(
            status,
            ApiError(
                code=code,
                message=str(error.get("message", "the job failed")),
                details=[{"job_id": str(job.id), "status": final.status}],
            ),
            headers=headers,
        )
    completion = ChatCompletion.model_validate(final.result)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _stream(completion, include_usage, headers)
    return Response(completion.model_dump_json(), media_type="application/json", headers=headers)
