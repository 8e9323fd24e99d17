"""``/v1/batches``: the OpenAI Batch API. Create a batch from an uploaded input file,
follow it, cancel it, list a tenant's batches; its output and error files are read
through ``/v1/files`` once it has ended."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.responses import JSONResponse

from kontext.store import batches, files
from producers.api.auth import Caller
from producers.api.errors import error_response
from producers.api.state import ApiState, state
from producers.batches import submit_batch
from schemas.api import ApiError, ErrorBody
from schemas.batches import BatchCreate, BatchList, BatchView
from schemas.files import parse_file_id

router = APIRouter(prefix="/v1/batches", tags=["batches"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 422, 503)
}
NOT_FOUND: dict[int | str, dict[str, object]] = {code: {"model": ErrorBody} for code in (401, 404)}


def _invalid_file(status: int, message: str) -> JSONResponse:
    error = ApiError(code="invalid_input_file", message=message, param="input_file_id")
    return error_response(status, error)


@router.post("", status_code=202, response_model=BatchView, responses=ERRORS)
async def create_batch(
    create: BatchCreate,
    response: Response,
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> BatchView | JSONResponse:
    """Validate every line of the input file and run the good ones as background jobs;
    bad lines are listed in ``errors`` by line number. An ``Idempotency-Key`` header (or
    ``idempotency_key``; both must agree) seen before returns that batch (200)."""
    if idempotency_key and create.idempotency_key not in (None, idempotency_key):
        return error_response(
            400,
            ApiError(
                code="idempotency_key_conflict",
                message="the body's idempotency_key and the Idempotency-Key header differ",
                param="idempotency_key",
            ),
        )
    file = parse_file_id(create.input_file_id)
    found = None if file is None else await files.content(api.pool, file, principal.tenant_id)
    if found is None or file is None:
        return _invalid_file(404, f"no file {create.input_file_id}")
    row, content = found
    if row.purpose != "batch":
        return _invalid_file(400, f"file {create.input_file_id} has purpose {row.purpose}")
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return _invalid_file(400, f"file {create.input_file_id} is not UTF-8 text")
    if idempotency_key and create.idempotency_key is None:
        create = create.model_copy(update={"idempotency_key": idempotency_key})
    batch, created = await submit_batch(
        api.settings,
        api.pool,
        api.producer,
        create,
        text,
        input_file_id=file,
        tenant_id=principal.tenant_id,
        key_id=principal.key_id,
        chain=api.chain,
    )
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    if not created:
        response.status_code = 200
    return batch.view()


async def _batch(api: ApiState, batch_id: str, tenant_id: str) -> batches.BatchRow:
    row = await batches.get(api.pool, _uuid(batch_id), tenant_id)
    if row is None:
        raise HTTPException(404, f"no batch {batch_id}")
    return row


def _uuid(batch_id: str) -> UUID:
    try:
        return UUID(batch_id)
    except ValueError:
        raise HTTPException(404, f"no batch {batch_id}") from None


@router.get("", response_model=BatchList, responses={401: {"model": ErrorBody}})
async def list_batches(
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64)] = None,
) -> BatchList:
    """The tenant's batches, newest first; page with ``after`` (the previous page's last
    id). An ``after`` that names none of its batches ends the list: an empty page, as for
    files."""
    try:
        cursor = None if after is None else UUID(after)
    except ValueError:
        return BatchList(data=[], first_id=None, last_id=None, has_more=False)
    rows, more = await batches.page(api.pool, principal.tenant_id, limit=limit, after=cursor)
    data = [row.view() for row in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=more,
    )


@router.get("/{batch_id}", response_model=BatchView, responses=NOT_FOUND)
async def get_batch(
    batch_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> BatchView:
    """The batch's status, counts, timestamps and, once it has ended, its files."""
    return (await _batch(api, batch_id, principal.tenant_id)).view()


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchView,
    responses={**NOT_FOUND, 409: {"model": ErrorBody}},
)
async def cancel_batch(
    batch_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> BatchView:
    """Stop an open batch: lines the engine has not begun fail as ``batch_cancelled``
    (queued ones now, enriched ones as they reach the inference worker; the budget they
    held is released), those it runs finish, then the batch is ``cancelled``."""
    row = await batches.cancel(api.pool, _uuid(batch_id), principal.tenant_id)
    if row is None:
        raise HTTPException(404, f"no batch {batch_id}")
    if row.status not in ("cancelling", "cancelled"):
        raise HTTPException(409, f"batch {batch_id} is {row.status}; it cannot be cancelled")
    return row.view()
