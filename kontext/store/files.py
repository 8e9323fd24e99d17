"""Files in Postgres (the OpenAI Files API): uploaded batch inputs and the output and
error files batches write when they end. Raw asyncpg; every read is scoped to a tenant.

Listing never reads ``content``; only ``content()`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID, uuid4

import asyncpg

from schemas.files import FileObject, FilePurpose, file_id

_COLUMNS = "id, purpose, filename, bytes, created_at"


@dataclass(frozen=True)
class FileRow:
    id: UUID
    purpose: FilePurpose
    filename: str
    bytes: int
    created_at: datetime

    def view(self) -> FileObject:
        return FileObject(
            id=file_id(self.id),
            bytes=self.bytes,
            created_at=int(self.created_at.timestamp()),
            filename=self.filename,
            purpose=self.purpose,
        )


def _row(record: asyncpg.Record) -> FileRow:
    return FileRow(**dict(record))


async def create(
    conn: asyncpg.Pool | asyncpg.Connection,
    tenant_id: str,
    purpose: FilePurpose,
    filename: str,
    content: bytes,
) -> FileRow:
    """Store a file of the tenant's."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO files (id, tenant_id, purpose, filename, bytes, content)
        VALUES ($1, $2, $3, $4, $5, $6)
        RETURNING {_COLUMNS}
        """,
        uuid4(),
        tenant_id,
        purpose,
        filename,
        len(content),
        content,
    )
    assert row is not None
    return _row(row)


async def get(pool: asyncpg.Pool, file: UUID, tenant_id: str) -> FileRow | None:
    """The tenant's file (without its content), or None."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS} FROM files WHERE id = $1 AND tenant_id = $2", file, tenant_id
    )
    return _row(row) if row is not None else None


async def content(pool: asyncpg.Pool, file: UUID, tenant_id: str) -> tuple[FileRow, bytes] | None:
    """The tenant's file and its content, or None."""
    row = await pool.fetchrow(
        f"SELECT {_COLUMNS}, content FROM files WHERE id = $1 AND tenant_id = $2",
        file,
        tenant_id,
    )
    if row is None:
        return None
    found = dict(row)
    data: bytes = found.pop("content")
    return FileRow(**found), data


async def page(
    pool: asyncpg.Pool,
    tenant_id: str,
    *,
    purpose: str | None = None,
    limit: int = 10_000,
    after: UUID | None = None,
    newest_first: bool = True,
) -> tuple[list[FileRow], bool]:
    """The tenant's files by ``created_at`` (then id), past the file ``after`` when given;
    returns at most ``limit`` of them and whether more follow."""
    order = "DESC" if newest_first else "ASC"
    beyond = "<" if newest_first else ">"
    rows = await pool.fetch(
        f"""
        SELECT {_COLUMNS} FROM files
        WHERE tenant_id = $1 AND ($2::text IS NULL OR purpose = $2)
            AND ($3::uuid IS NULL OR (created_at, id) {beyond}
                (SELECT created_at, id FROM files WHERE id = $3 AND tenant_id = $1))
        ORDER BY created_at {order}, id {order}
        LIMIT $4
        """,
        tenant_id,
        purpose,
        after,
        limit + 1,
    )
    return [_row(r) for r in rows[:limit]], len(rows) > limit


async def delete(pool: asyncpg.Pool, file: UUID, tenant_id: str) -> bool:
    """Delete the tenant's file; whether there was one."""
    deleted = await pool.fetchval(
        "DELETE FROM files WHERE id = $1 AND tenant_id = $2 RETURNING id", file, tenant_id
    )
    return deleted is not None
