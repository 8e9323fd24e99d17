"""Every error as ``{"error": {"code", "message", ...}}``; never a stack trace."""

from __future__ import annotations

import logging
import math

from asyncpg.exceptions import (
    InterfaceError,
    InternalClientError,
    OperatorInterventionError,
    PostgresConnectionError,
)
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from producers.refusals import answer_for, invalid
from producers.submit import SubmissionRejected
from schemas.api import ApiError, ErrorBody, error_type
from workers.intake import EnqueueFailed
from workers.policies.base import Refused

log = logging.getLogger(__name__)


def error_response(
    status: int, error: ApiError, headers: dict[str, str] | None = None
) -> JSONResponse:
    if error.type is None:
        error = error.model_copy(update={"type": error_type(status)})
    body = ErrorBody(error=error).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    answer = invalid(exc.errors())
    return error_response(answer.status, answer.error)


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    """A refused submission (the deployment, a policy, the queue): ``producers.refusals``."""
    answer = answer_for(exc)
    assert answer is not None
    headers = None
    if answer.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(answer.retry_after_s)))}
    return error_response(answer.status, answer.error, headers=headers)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable or restarting: nothing was stored, the client may retry."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        ApiError(code="database_unavailable", message="the database is unavailable; try again"),
        headers={"Retry-After": "5"},
    )


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        415: "unsupported_media_type",
    }.get(exc.status_code, "http_error")
    return error_response(
        exc.status_code,
        ApiError(code=code, message=str(exc.detail)),
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, ApiError(code="internal_error", message="internal error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    for refusal in (SubmissionRejected, Refused, EnqueueFailed):
        app.add_exception_handler(refusal, _refused)
    app.add_exception_handler(HTTPException, _http)
    # A connection lost or left mid-operation while the database restarts is as
    # unavailable as a refused one.
    unavailable_errors = (
        OSError,
        PostgresConnectionError,
        OperatorInterventionError,
        InterfaceError,
        InternalClientError,
    )
    for unavailable in unavailable_errors:
        app.add_exception_handler(unavailable, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
