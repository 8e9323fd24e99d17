"""An ended batch's output and error files, in the OpenAI Batch formats.

The output file has one line per succeeded request (``response`` set); the error
file one per bad input line (``error.line``, its 1-based line number) and one per
failed request (``error`` set). Each is stored as a ``batch_output`` file of the
batch's tenant, in the transaction that queues the batch's end event; a batch
with no line for one of them has none (its id stays null, as OpenAI does).
"""

from __future__ import annotations

from dataclasses import replace
from uuid import UUID

import asyncpg
import orjson

from kontext.store import batches, files
from schemas.batches import OutputError, OutputLine, OutputResponse


def output_line(job: batches.JobLine) -> OutputLine:
    """A job of the batch as its output line (succeeded) or error line (failed)."""
    line_id = f"batch_req_{job.job_id.hex}"
    if job.status == "succeeded" and job.result is not None:
        return OutputLine(
            id=line_id,
            custom_id=job.custom_id,
            response=OutputResponse(status_code=200, request_id=str(job.job_id), body=job.result),
        )
    error = job.error or {"code": "failed", "message": "the request failed"}
    return OutputLine(id=line_id, custom_id=job.custom_id, error=OutputError.model_validate(error))


def _dump(line: OutputLine) -> bytes:
    return orjson.dumps(line.model_dump(mode="json")) + b"\n"


async def _content(conn: asyncpg.Connection, row: batches.BatchRow, succeeded: bool) -> bytes:
    parts: list[bytes] = []
    if not succeeded:
        for bad in row.bad_lines:
            error = OutputError(code=bad.code, message=bad.message, line=bad.line)
            parts.append(_dump(OutputLine(id=None, custom_id=bad.custom_id, error=error)))
    async for chunk in batches.job_lines(conn, row.id, succeeded=succeeded):
        parts.extend(_dump(output_line(job)) for job in chunk)
    return b"".join(parts)


async def write(conn: asyncpg.Connection, row: batches.BatchRow) -> batches.BatchRow:
    """Store the ended batch's output and error files and record them on the batch, unless
    it has them already (``conn`` in the transaction that ended the batch, or holds its
    row); returns the batch with them."""
    if row.output_file_id is not None or row.error_file_id is not None:
        return row
    ids: list[UUID | None] = []
    for succeeded, name in ((True, "output"), (False, "error")):
        content = await _content(conn, row, succeeded)
        if not content:
            ids.append(None)
            continue
        stored = await files.create(
            conn, row.tenant_id, "batch_output", f"batch_{row.id.hex}_{name}.jsonl", content
        )
        ids.append(stored.id)
    await batches.set_files(conn, row.id, ids[0], ids[1])
    return replace(row, output_file_id=ids[0], error_file_id=ids[1])
