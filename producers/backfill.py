"""``kontext backfill``: run an OpenAI Batch input file through a Kontext API over HTTP,
with its OpenAI Files and Batches endpoints: upload the file, create the batch, follow
it, download its output and error files.

Resumable by construction. Custom_ids that already have a succeeded line in the
output file are not submitted again; the rest is submitted with an idempotency
key derived from its content (``backfill:<sha256>``), so a rerun after an
interruption attaches to the same batch instead of creating a second one (the file
uploaded again is then deleted), while that batch is open; once it has ended, the
next key names it (``backfill:<sha256>:after:<batch id>``) and a new batch runs. The
output and error files are written only once the batch has ended, each to a
temporary file renamed into place: an interrupted run leaves them as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from schemas.batches import ENDED, ENDPOINT, BatchView, jsonl_lines

T = TypeVar("T")

POLL_S = 0.5
LONG = httpx.Timeout(30.0, read=600.0)
"""For an upload, and for a batch's creation: it validates and queues every line."""
INTERRUPTED = 130


class BadInput(Exception):
    """An input the run cannot read, or an output it cannot write: nothing is submitted."""


@dataclass
class Plan:
    """What a run submits: the input's lines minus those already done."""

    lines: list[str] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    """The input file's line number of each submitted line."""
    done: dict[str, bytes] = field(default_factory=dict)
    """Succeeded output lines kept from an earlier run, by custom_id."""
    order: list[str] = field(default_factory=list)
    """Every custom_id of the input, in input order."""
    total: int = 0
    """The input's request lines (its lines that are not blank)."""
    bad: list[bytes] = field(default_factory=list)
    """Error-file lines of the bad input lines an earlier run reported, each line unchanged
    since: they can never succeed, so they are reported again, not submitted."""

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)

    @property
    def key(self) -> str:
        return "backfill:" + hashlib.sha256(self.text.encode()).hexdigest()


def _custom_id(raw: str | bytes) -> str | None:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = line.get("custom_id") if isinstance(line, dict) else None
    return value if isinstance(value, str) else None


def _sha256(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _reported_bad(errors: Path) -> dict[int, tuple[str, bytes]]:
    """The bad input lines of an earlier run's error file: by line number, the sha256
    of the line it refused and its error-file line."""
    found: dict[int, tuple[str, bytes]] = {}
    if not errors.is_file():
        return found
    for raw in errors.read_bytes().split(b"\n"):
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            error = orjson.loads(raw).get("error") or {}
            line, sha256 = error.get("line"), error.get("line_sha256")
            if isinstance(line, int) and isinstance(sha256, str):
                found[line] = (sha256, raw)
    return found


def _line_number(raw: bytes) -> float:
    """An error-file line's input line number; a failed request's (none) sorts last."""
    line = (orjson.loads(raw).get("error") or {}).get("line")
    return line if isinstance(line, int) else math.inf


def _succeeded(out: Path) -> dict[str, bytes]:
    done: dict[str, bytes] = {}
    if not out.exists():
        return done
    for raw in out.read_bytes().split(b"\n"):
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            line = orjson.loads(raw)
            if line["response"]["status_code"] == 200 and isinstance(line["custom_id"], str):
                done[line["custom_id"]] = raw
    return done


def _text(source: Path) -> str:
    """The input file's text; BadInput if it cannot be read or is not UTF-8."""
    try:
        return source.read_bytes().decode()
    except IsADirectoryError:
        raise BadInput(f"{source} is a directory, not a JSONL file") from None
    except OSError as exc:
        raise BadInput(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"{source} is not UTF-8 text (byte {exc.start})") from None


def writable(path: Path) -> None:
    """BadInput unless the file can be written: its temporary file is created and removed."""
    if path.is_dir():
        raise BadInput(f"{path} is a directory; give a file to write")
    temporary = _temporary(path)
    try:
        temporary.touch()
        temporary.unlink()
    except OSError as exc:
        raise BadInput(f"cannot write {path}: {exc.strerror or exc}") from None


def plan(source: Path, out: Path, errors: Path | None = None) -> Plan:
    """The lines of ``source`` whose custom_id has no succeeded line in ``out`` yet, less
    those ``errors`` reports as bad lines; BadInput if ``source`` cannot be read or has
    no request line."""
    result = Plan(done=_succeeded(out))
    reported = _reported_bad(errors) if errors is not None else {}
    for number, raw in enumerate(jsonl_lines(_text(source)), 1):
        if not raw.strip():
            continue
        result.total += 1
        sha256, error_line = reported.get(number, ("", b""))
        if sha256 == _sha256(raw):
            result.bad.append(error_line)
            continue
        custom_id = _custom_id(raw)
        if custom_id is not None:
            result.order.append(custom_id)
            if custom_id in result.done:
                continue
        result.lines.append(raw)
        result.origin.append(number)
    if not result.total:
        raise BadInput(f"{source}: the input has no request lines")
    return result


class RateColumn(ProgressColumn):
    """Requests finished per second."""

    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:,.1f} req/s" if speed else "- req/s", style="progress.data.speed")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _write(path: Path, lines: Iterable[bytes]) -> int:
    """Write lines to ``path`` through a temporary file renamed into place."""
    count = 0
    temporary = _temporary(path)
    with temporary.open("wb") as handle:
        for line in lines:
            handle.write(line.rstrip(b"\n") + b"\n")
            count += 1
    os.replace(temporary, path)
    return count


def _settled(batch: BatchView) -> int:
    bad = len(batch.bad_lines)
    return batch.request_counts.completed + batch.request_counts.failed - bad


async def upload(
    http: httpx.AsyncClient, content: bytes, filename: str = "input.jsonl"
) -> httpx.Response:
    """``POST /v1/files``: ``content`` as a batch input file."""
    return await http.post(
        "/v1/files",
        files={"file": (filename, content, "application/jsonl")},
        data={"purpose": "batch"},
        timeout=LONG,
    )


async def create_batch(
    http: httpx.AsyncClient,
    content: bytes,
    *,
    idempotency_key: str | None = None,
    filename: str = "input.jsonl",
    **options: Any,
) -> httpx.Response:
    """Upload ``content`` (OpenAI Batch JSONL) and create a batch from it (``options``:
    more fields of ``POST /v1/batches``, e.g. ``metadata``, ``webhook``); the batch
    answer, or the upload's when the upload was refused."""
    uploaded = await upload(http, content, filename)
    if uploaded.status_code >= 400:
        return uploaded
    body = {
        "input_file_id": uploaded.json()["id"],
        "endpoint": ENDPOINT,
        "completion_window": "24h",
        **options,
    }
    headers = {"idempotency-key": idempotency_key} if idempotency_key else {}
    return await http.post("/v1/batches", json=body, headers=headers, timeout=LONG)


class Backfill:
    """One run: submit (or attach to) the batch, follow it, write the files."""

    def __init__(
        self,
        api: str,
        source: Path,
        out: Path,
        errors: Path,
        console: Console,
        api_key: str | None = None,
    ) -> None:
        self.api = api
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.source = source
        self.out = out
        self.errors = errors
        self.console = console

    async def run(self, stop: asyncio.Event) -> int:
        """Returns the exit status: 0 once the batch completed, 1 if it ended otherwise
        or the API could not be reached, 2 if the input or an output path cannot be used
        or the API refused the batch, 130 if interrupted."""
        try:
            return await self._run(stop)
        except BadInput as exc:
            self.console.print(f"[red]{escape(str(exc))}", soft_wrap=True)
            return 2
        except httpx.TransportError as exc:
            self.console.print(
                f"[red]cannot reach the Kontext API at {self.api}: {exc or type(exc).__name__}"
                "[/]; rerun the same command once it answers (a batch it took goes on there)"
            )
            return 1

    async def _run(self, stop: asyncio.Event) -> int:
        writable(self.out)
        writable(self.errors)
        todo = plan(self.source, self.out, self.errors)
        for raw in todo.bad:
            error = orjson.loads(raw)["error"]
            self._say_bad(error["line"], error["code"], error["message"])
        if not todo.lines:
            return self._nothing_to_do(todo)
        if todo.done:
            self.console.print(f"{len(todo.done)} custom_ids already succeeded in {self.out}")
        async with httpx.AsyncClient(base_url=self.api, timeout=LONG, headers=self.headers) as http:
            batch = await _until(stop, self._submit(http, todo))
            if batch is None:
                self.console.print("interrupted while submitting; rerun the same command")
                return INTERRUPTED
            if isinstance(batch, str):
                self.console.print(f"[red]the API refused the batch: {batch}")
                return 2
            self._report_bad_lines(batch, todo)
            batch = await self._follow(http, batch, stop)
            if batch.status not in ENDED:
                self.console.print(
                    f"interrupted; batch {batch.id} goes on: rerun the same command to resume"
                )
                return INTERRUPTED
            await self._save(http, batch, todo)
        return 0 if batch.status == "completed" else 1

    async def _submit(self, http: httpx.AsyncClient, todo: Plan) -> BatchView | str:
        uploaded = await upload(http, todo.text.encode(), self.source.name)
        if uploaded.status_code >= 400:
            return uploaded.text
        file_id = uploaded.json()["id"]
        found = await self._open_batch(http, file_id, todo.key)
        if isinstance(found, str) or found[0].input_file_id != file_id:
            await http.delete(f"/v1/files/{file_id}")  # refused, or resumed: it has its own
        if isinstance(found, str):
            return found
        batch, resumed = found
        bad = len(batch.bad_lines)
        self.console.print(
            f"batch {batch.id} {'resumed' if resumed else 'submitted'}: "
            f"{batch.request_counts.total} lines, "
            f"{batch.request_counts.total - bad} requests, {bad} bad lines"
        )
        return batch

    async def _open_batch(
        self, http: httpx.AsyncClient, file_id: str, key: str
    ) -> tuple[BatchView, bool] | str:
        """The batch of these lines still open (resumed), else a new one; the API's
        refusal as text. An earlier batch of theirs that ended (a run cancelled, failed,
        expired or completed) is passed over: its key, with its id, names the next."""
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}
        attempt = key
        while True:
            response = await http.post(
                "/v1/batches", json=body, headers={"idempotency-key": attempt}
            )
            if response.status_code >= 400:
                return response.text
            batch = BatchView.model_validate_json(response.content)
            if response.status_code != 200:
                return batch, False
            if batch.status not in ENDED:
                return batch, True
            self.console.print(f"batch {batch.id} of these lines ended {batch.status}")
            attempt = f"{key}:after:{batch.id}"

    def _nothing_to_do(self, todo: Plan) -> int:
        """Every line succeeded or is bad: the error file keeps the bad ones; 0 when a
        line succeeded, as the run that found them (1 when none did: its batch failed)."""
        _write(self.errors, todo.bad)
        bad = f" and {len(todo.bad)} lines are bad (in {self.errors})" if todo.bad else ""
        self.console.print(
            f"all {len(todo.done)} custom_ids already succeeded in {self.out}{bad}; nothing to do"
        )
        return 0 if todo.done else 1

    def _report_bad_lines(self, batch: BatchView, todo: Plan) -> None:
        for bad in batch.bad_lines:
            self._say_bad(
                todo.origin[bad.line - 1] if bad.line is not None else "?", bad.code, bad.message
            )

    def _say_bad(self, line: int | str, code: str, message: str) -> None:
        self.console.print(f"[yellow]line {line}[/]: {code}: {escape(message)}")

    async def _follow(
        self, http: httpx.AsyncClient, batch: BatchView, stop: asyncio.Event
    ) -> BatchView:
        good = batch.request_counts.total - len(batch.bad_lines)
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(batch.status, total=good, completed=_settled(batch))
            while batch.status not in ENDED and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=POLL_S)
                response = await http.get(f"/v1/batches/{batch.id}")
                response.raise_for_status()
                batch = BatchView.model_validate_json(response.content)
                progress.update(task, completed=_settled(batch), description=batch.status)
        return batch

    async def _lines(self, http: httpx.AsyncClient, file_id: str | None) -> list[bytes]:
        """The lines of one of the batch's files (none when it has no such file)."""
        if file_id is None:
            return []
        response = await http.get(f"/v1/files/{file_id}/content")
        response.raise_for_status()
        return [line for line in response.content.split(b"\n") if line.strip()]

    async def _save(self, http: httpx.AsyncClient, batch: BatchView, todo: Plan) -> None:
        results = dict(todo.done)
        for raw in await self._lines(http, batch.output_file_id):
            custom_id = _custom_id(raw)
            if custom_id is not None:
                results[custom_id] = raw
        ordered = [results.pop(c) for c in dict.fromkeys(todo.order) if c in results]
        written = _write(self.out, [*ordered, *results.values()])
        failures = [
            *todo.bad,
            *(self._renumber(raw, todo) for raw in await self._lines(http, batch.error_file_id)),
        ]
        _write(self.errors, sorted(failures, key=_line_number))
        counts, bad = batch.request_counts, len(batch.bad_lines)
        self.console.print(
            f"batch {batch.id} {batch.status}: {counts.completed} succeeded, "
            f"{counts.failed - bad} failed, {bad + len(todo.bad)} bad lines; "
            f"{self.out}: {written} lines, {self.errors}: {len(failures)} lines"
        )

    @staticmethod
    def _renumber(raw: bytes, todo: Plan) -> bytes:
        """An error line with ``error.line`` counted in the input file, not the submission,
        and ``error.line_sha256`` the sha256 of that line (a rerun skips it while unchanged)."""
        line: dict[str, Any] = orjson.loads(raw)
        error = line.get("error") or {}
        if isinstance(error.get("line"), int):
            submitted = error["line"] - 1
            error["line"] = todo.origin[submitted]
            error["line_sha256"] = _sha256(todo.lines[submitted])
        return orjson.dumps(line)


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """The result of ``work``, or None if ``stop`` is set first (``work`` is cancelled)."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None
