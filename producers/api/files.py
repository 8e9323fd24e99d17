"""``/v1/files``: the OpenAI Files API for batch input files and batch output files,
each a tenant's own (another tenant's file is a 404)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args
from uuid import UUID

from fastapi import APIRouter, Depends, Form, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response

from kontext.store import files
from producers.api.auth import Caller
from producers.api.errors import error_response
from producers.api.state import ApiState, state
from schemas.api import ApiError, ErrorBody
from schemas.files import (
    UPLOAD_PURPOSES,
    FileDeleted,
    FileList,
    FileObject,
    FilePurpose,
    parse_file_id,
)
from schemas.files import file_id as show_id

router = APIRouter(prefix="/v1/files", tags=["files"])

JSONL = "application/jsonl"
UPLOAD_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422)
}
NOT_FOUND: dict[int | str, dict[str, object]] = {code: {"model": ErrorBody} for code in (401, 404)}
MULTIPART_SLACK = 1 << 20
"""Room for the multipart framing and form fields around the largest file."""
MAX_FILENAME = 255
PURPOSES: tuple[str, ...] = get_args(FilePurpose)


def body_limit(max_file_bytes: int) -> int:
    """The most ``POST /v1/files`` may send (the body size middleware's limit)."""
    return max_file_bytes + MULTIPART_SLACK


def _uuid(value: str) -> UUID:
    found = parse_file_id(value)
    if found is None:
        raise HTTPException(404, f"no file {value}")
    return found


@router.post("", response_model=FileObject, responses=UPLOAD_ERRORS)
async def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form()],
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
) -> FileObject | JSONResponse:
    """Upload a batch input file (multipart ``file`` and ``purpose=batch``), at most
    ``KONTEXT_FILES_MAX_BYTES`` bytes; its lines are checked when a batch uses it."""
    if purpose not in UPLOAD_PURPOSES:
        allowed = ", ".join(UPLOAD_PURPOSES)
        return error_response(
            400,
            ApiError(code="invalid_purpose", message=f"purpose must be {allowed}", param="purpose"),
        )
    limit = api.settings.files_max_bytes
    content = await file.read(limit + 1)
    if len(content) > limit:
        message = f"the file exceeds {limit} bytes, the limit (KONTEXT_FILES_MAX_BYTES)"
        return error_response(413, ApiError(code="file_too_large", message=message, param="file"))
    name = (file.filename or "").replace("\x00", "")[:MAX_FILENAME] or "upload.jsonl"
    row = await files.create(api.pool, principal.tenant_id, "batch", name, content)
    return row.view()


@router.get("", response_model=FileList, responses={401: {"model": ErrorBody}})
async def list_files(
    api: Annotated[ApiState, Depends(state)],
    principal: Caller,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> FileList:
    """The tenant's files by creation time (newest first unless ``order=asc``); page with
    ``after`` (the last id of the previous page)."""
    cursor = None if after is None else parse_file_id(after)
    if (after is not None and cursor is None) or (purpose and purpose not in PURPOSES):
        return FileList(data=[], first_id=None, last_id=None, has_more=False)
    rows, more = await files.page(
        api.pool,
        principal.tenant_id,
        purpose=purpose,
        limit=limit,
        after=cursor,
        newest_first=order == "desc",
    )
    data = [row.view() for row in rows]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=more,
    )


@router.get("/{file_id}", response_model=FileObject, responses=NOT_FOUND)
async def get_file(
    file_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> FileObject:
    """The file's size, name, purpose and creation time."""
    row = await files.get(api.pool, _uuid(file_id), principal.tenant_id)
    if row is None:
        raise HTTPException(404, f"no file {file_id}")
    return row.view()


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={**NOT_FOUND, 200: {"content": {JSONL: {}}}},
)
async def file_content(
    file_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> Response:
    """The file's bytes (JSON lines)."""
    found = await files.content(api.pool, _uuid(file_id), principal.tenant_id)
    if found is None:
        raise HTTPException(404, f"no file {file_id}")
    row, content = found
    return Response(
        content,
        media_type=JSONL,
        headers={"Content-Disposition": f'attachment; filename="{_ascii(row.filename)}"'},
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=NOT_FOUND)
async def delete_file(
    file_id: str, api: Annotated[ApiState, Depends(state)], principal: Caller
) -> FileDeleted:
    """Delete the file (a batch that used it keeps its id)."""
    uuid = _uuid(file_id)
    if not await files.delete(api.pool, uuid, principal.tenant_id):
        raise HTTPException(404, f"no file {file_id}")
    return FileDeleted(id=show_id(uuid))


def _ascii(name: str) -> str:
    """The filename as a header may carry it."""
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
