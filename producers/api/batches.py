"""``/v1/batches``: submit an OpenAI Batch input file, follow it, cancel it, read its
output and error files (JSON lines)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from kontext.store import batches
from producers.api.auth import Caller
from producers.api.state import ApiState, state
from producers.batches import submit_batch
from schemas.api import ErrorBody
from schemas.batches import BatchCreate, BatchView, OutputError, OutputLine, OutputResponse

router = APIRouter(prefix="/v1/batches", tags=["batches"])

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/json-lines", "text/plain")
JSONL = "application/jsonl"
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 409, 413, 415, 422, 503)
}
NOT_FOUND: dict[int | str, dict[str, object]] = {code: {"model": ErrorBody} for code in (401, 404)}


def _create_body(request: Request, raw: bytes) -> BatchCreate:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    key = request.headers.get("idempotency-key")
    try:
        if kind == "application/json":
            create = BatchCreate.model_validate_json(raw)
        elif kind in JSONL_TYPES:
            create = BatchCreate(input=raw.decode())
        else:
            raise HTTPException(
                415, "send the input as application/jsonl (or text/plain), or as JSON {input}"
            )
        if key and create.idempotency_key is None:
            create = BatchCreate.model_validate({**create.model_dump(), "idempotency_key": key})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    except UnicodeDecodeError:
        raise HTTPException(400, "the input is not UTF-8") from None
    return create


@router.post("", status_code=202, response_model=BatchView, responses=ERRORS)
async def create_batch(
    request: Request,
    response: Response,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
) -> BatchView:
    """Validate every line, run the good ones as background jobs; bad lines are listed
    in ``errors`` by line number. An ``Idempotency-Key`` header (or ``idempotency_key``)
    seen before returns that batch (200)."""
    create = _create_body(request, await request.body())
    row, created = await submit_batch(
        api.settings,
        api.pool,
        api.producer,
        create,
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        chain=api.chain,
    )
    response.headers["Location"] = f"/v1/batches/{row.id}"
    if not created:
        response.status_code = 200
    return row.view()


async def _batch(api: ApiState, batch_id: UUID, tenant_id: str) -> batches.BatchRow:
    row = await batches.get(api.pool, batch_id, tenant_id)
    if row is None:
        raise HTTPException(404, f"no batch {batch_id}")
    return row


@router.get("/{batch_id}", response_model=BatchView, responses=NOT_FOUND)
async def get_batch(
    batch_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> BatchView:
    """The batch's status, counts and timestamps."""
    return (await _batch(api, batch_id, principal.tenant_id)).view()


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchView,
    responses={**NOT_FOUND, 409: {"model": ErrorBody}},
)
async def cancel_batch(
    batch_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> BatchView:
    """Stop an open batch: jobs not started fail as ``batch_cancelled`` (the budget they
    held is released), running ones finish, then the batch is ``cancelled``."""
    row = await batches.cancel(api.pool, batch_id, principal.tenant_id)
    if row is None:
        raise HTTPException(404, f"no batch {batch_id}")
    if row.status not in ("cancelling", "cancelled"):
        raise HTTPException(409, f"batch {batch_id} is {row.status}; it cannot be cancelled")
    return row.view()


def _line(job: batches.JobLine) -> OutputLine:
    line_id = f"batch_req_{job.job_id.hex}"
    if job.status == "succeeded" and job.result is not None:
        return OutputLine(
            id=line_id,
            custom_id=job.custom_id,
            response=OutputResponse(status_code=200, request_id=str(job.job_id), body=job.result),
        )
    error = job.error or {"code": "failed", "message": "the request failed"}
    return OutputLine(id=line_id, custom_id=job.custom_id, error=OutputError(**error))


async def _stream(api: ApiState, row: batches.BatchRow, succeeded: bool) -> AsyncIterator[bytes]:
    if not succeeded:
        for bad in row.view().errors:
            error = OutputError(code=bad.code, message=bad.message, line=bad.line)
            yield _dump(OutputLine(id=None, custom_id=bad.custom_id, error=error))
    async for chunk in batches.job_lines(api.pool, row.id, succeeded=succeeded):
        yield b"".join(_dump(_line(job)) for job in chunk)


def _dump(line: OutputLine) -> bytes:
    return orjson.dumps(line.model_dump(mode="json")) + b"\n"


@router.get("/{batch_id}/output", responses=NOT_FOUND)
async def batch_output(
    batch_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> StreamingResponse:
    """The succeeded requests so far, as OpenAI Batch output lines (JSONL)."""
    row = await _batch(api, batch_id, principal.tenant_id)
    return StreamingResponse(_stream(api, row, succeeded=True), media_type=JSONL)


@router.get("/{batch_id}/errors", responses=NOT_FOUND)
async def batch_errors(
    batch_id: UUID, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> StreamingResponse:
    """The bad input lines (with ``error.line``) and the failed requests so far (JSONL)."""
    row = await _batch(api, batch_id, principal.tenant_id)
    return StreamingResponse(_stream(api, row, succeeded=False), media_type=JSONL)
