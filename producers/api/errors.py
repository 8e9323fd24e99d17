"""Every error as ``{"error": {"code", "message", ...}}``; never a stack trace."""

from __future__ import annotations

import logging

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

from producers.submit import SubmissionRejected
from schemas.api import ApiError, ErrorBody
from workers.intake import EnqueueFailed

log = logging.getLogger(__name__)


def error_response(
    status: int, error: ApiError, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=error).model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(error: dict[str, object]) -> dict[str, object]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]  # type: ignore[attr-defined]
    return {
        "field": ".".join(loc) or "body",
        "message": error.get("msg"),
        "type": error.get("type"),
    }


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [_describe(dict(e)) for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return error_response(
            400, ApiError(code="malformed_json", message="the body is not valid JSON")
        )
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return error_response(422, ApiError(code="invalid_request", message=summary, details=errors))


async def _rejected(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SubmissionRejected)
    status = {
        "unknown_model": 400,
        "idempotency_key_reused": 409,
        "conversation_not_found": 404,
    }.get(exc.code, 422)
    return error_response(
        status, ApiError(code=exc.code, message=exc.message, served_models=exc.served_models)
    )


async def _enqueue_failed(_: Request, exc: Exception) -> JSONResponse:
    return error_response(
        503,
        ApiError(code="queue_unavailable", message="the job could not be queued; try again"),
        headers={"Retry-After": "5"},
    )


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
    app.add_exception_handler(SubmissionRejected, _rejected)
    app.add_exception_handler(EnqueueFailed, _enqueue_failed)
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
