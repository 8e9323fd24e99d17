"""HTTP bodies of the files API (OpenAI's File objects), and the file id format."""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from pydantic import BaseModel

FilePurpose = Literal["batch", "batch_output"]
UPLOAD_PURPOSES: tuple[FilePurpose, ...] = ("batch",)
"""What ``POST /v1/files`` accepts; ``batch_output`` files are written by batches."""
FILE_PREFIX = "file-"


def file_id(uuid: UUID) -> str:
    """A file's id as the API shows it: ``file-`` and the UUID's 32 hex digits."""
    return f"{FILE_PREFIX}{uuid.hex}"


def parse_file_id(value: str) -> UUID | None:
    """The UUID inside a file id, or None when ``value`` is not one."""
    if not value.startswith(FILE_PREFIX) or len(value) != len(FILE_PREFIX) + 32:
        return None
    try:
        return UUID(hex=value[len(FILE_PREFIX) :])
    except ValueError:
        return None


class FileObject(BaseModel):
    """``GET /v1/files/{id}``: an OpenAI File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    """Unix seconds."""
    filename: str
    purpose: FilePurpose
    status: Literal["processed"] = "processed"


class FileList(BaseModel):
    """``GET /v1/files``: a page of files, newest first by default."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    """``DELETE /v1/files/{id}``."""

    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
