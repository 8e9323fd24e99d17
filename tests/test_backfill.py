"""Batch backfills end to end: the ``kontext backfill`` CLI, and ``/v1/files`` with
``/v1/batches`` over plain HTTP, against the real stack (``tiny`` engine, one output
token per request)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from kontext.settings import Settings
from producers.backfill import create_batch, plan, upload
from producers.batch_lines import parse
from schemas.batches import ENDPOINT
from tests.conftest import WEBHOOK_SECRETS, Stack, wait_for
from tests.factories import batch_line, jsonl
from tests.receiver import Receiver, serving

# 10,000 lines take 110-230 s on the 2-core development machine, by its load.
BIG = int(os.environ.get("KONTEXT_TEST_BACKFILL_LINES", "10000"))
BIG_TIMEOUT_S = 420


def _input(path: Path, count: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    path.write_text(jsonl([batch_line(c, f"Say something about item {c}.") for c in ids]))
    return ids


def _read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines() if raw.strip()]


async def _cli(stack: Stack, *args: str | Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontext.cli",
        "backfill",
        *map(str, args),
        "--api",
        stack.api_url,
        "--api-key",
        stack.api_key,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )


async def _finish(process: asyncio.subprocess.Process, timeout: float) -> tuple[int, str]:
    output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return process.returncode, output.decode()


def _assert_complete_output(out: Path, ids: list[str]) -> None:
    lines = _read(out)
    custom_ids = [line["custom_id"] for line in lines]
    assert len(custom_ids) == len(set(custom_ids)), "a custom_id is repeated"
    assert custom_ids == ids, "missing custom_ids, or not in input order"
    for line in lines:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["model"] == "tiny"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 1
        assert line["id"] == f"batch_req_{uuid.UUID(line['response']['request_id']).hex}"


async def test_ten_thousand_line_backfill_writes_a_correct_output_file(
    stack: Stack, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = _input(source, BIG, "big")
    began = time.perf_counter()
    code, output = await _finish(await _cli(stack, source, "-o", out), BIG_TIMEOUT_S)
    elapsed = time.perf_counter() - began
    assert code == 0, output
    assert f"{BIG} succeeded, 0 failed, 0 bad lines" in output
    assert "req/s" in output and "ETA" in output
    _assert_complete_output(out, ids)
    assert _read(tmp_path / "out.errors.jsonl") == []
    print(f"\n{BIG} lines backfilled in {elapsed:.1f}s ({BIG / elapsed:.0f} requests/s)")

    # Every line ran as a background chat job of one batch, each in its own conversation.
    batch_id = await pool.fetchval(
        "SELECT id FROM batches WHERE idempotency_key = $1", plan(source, tmp_path / "none").key
    )
    rows = await pool.fetch(
        "SELECT request->>'priority' AS priority, kind, count(*) AS n, "
        "count(DISTINCT conversation_id) AS conversations FROM jobs WHERE batch_id = $1 "
        "GROUP BY 1, 2",
        batch_id,
    )
    assert [dict(r) for r in rows] == [
        {"priority": "background", "kind": "chat", "n": BIG, "conversations": BIG}
    ]

    # Its turns join memory too: the recorder embeds all 20,000, each batch's after
    # recording it (later tests need them embedded).
    async def embedded() -> bool:
        left = await pool.fetchval(
            "SELECT count(*) FROM turns t JOIN jobs j ON j.conversation_id = t.conversation_id "
            "WHERE j.batch_id = $1 AND t.embedding IS NULL",
            batch_id,
        )
        return left == 0

    await wait_for(embedded, timeout=BIG_TIMEOUT_S, interval=1)


async def test_an_interrupted_backfill_resumes_without_duplicates_or_gaps(
    stack: Stack, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = _input(source, 1500, "resume")
    key = plan(source, out).key

    async def progress() -> int:
        done: int | None = await pool.fetchval(
            "SELECT completed FROM batches WHERE idempotency_key = $1", key
        )
        return done or 0

    first = await _cli(stack, source, "-o", out)
    await wait_for(lambda: progress(), timeout=60, interval=0.1)
    first.send_signal(signal.SIGINT)
    code, output = await _finish(first, 30)
    assert code == 130, output
    assert "rerun the same command to resume" in output
    assert not out.exists()
    assert await progress() < len(ids), "interrupted too late to test resumption"

    second = await _cli(stack, source, "-o", out)
    code, output = await _finish(second, 120)
    assert code == 0, output
    assert "resumed" in output
    _assert_complete_output(out, ids)
    batch_id = await pool.fetchval("SELECT id FROM batches WHERE idempotency_key = $1", key)
    jobs = await pool.fetchval("SELECT count(*) FROM jobs WHERE batch_id = $1", batch_id)
    assert jobs == len(ids)

    # Results lost from the output file: a rerun submits only those custom_ids.
    kept = out.read_bytes().splitlines()
    out.write_bytes(b"\n".join(kept[:1000]) + b"\n")
    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert "1000 custom_ids already succeeded" in output
    assert "500 requests" in output
    _assert_complete_output(out, ids)
    code, output = await _finish(await _cli(stack, source, "-o", out), 60)
    assert code == 0 and "nothing to do" in output, output


async def test_a_rerun_submits_again_what_an_ended_batch_left_undone(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A rerun attaches to its lines' batch only while that batch is open: one that
    ended (here cancelled, then one completed) is passed over for a new one."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = _input(source, 20, "ended")
    todo = plan(source, out)
    cancelled = (await _post(http, todo.text, todo.key)).json()["id"]
    await http.post(f"/v1/batches/{cancelled}/cancel")
    await _wait_status(http, cancelled, ("cancelled",))

    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert f"batch {cancelled} of these lines ended cancelled" in output
    assert "submitted" in output and "resumed" not in output
    _assert_complete_output(out, ids)

    out.unlink()
    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert output.count("of these lines ended") == 2 and "submitted" in output
    _assert_complete_output(out, ids)


async def test_a_rerun_reports_bad_lines_again_and_submits_only_lines_that_changed(
    stack: Stack, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Bad input lines can never succeed: a rerun keeps them in the error file and exits
    as the first run did, without a batch; a line fixed since is submitted."""
    name = f"{uuid.uuid4().hex}.jsonl"
    source, out, errors = tmp_path / name, tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    lines: list[Any] = [
        batch_line("a"),
        "{not json",
        batch_line("b"),
        batch_line("a", "again"),
        batch_line("m", model="gpt-4o"),
    ]
    source.write_text(jsonl(lines))
    expected = [(2, "invalid_json"), (4, "duplicate_custom_id"), (5, "unknown_model")]

    def reported() -> list[tuple[int, str]]:
        return [(e["error"]["line"], e["error"]["code"]) for e in _read(errors)]

    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert reported() == expected
    kept = out.read_bytes()
    for _ in range(2):
        code, output = await _finish(await _cli(stack, source, "-o", out), 60)
        assert code == 0, output
        assert "2 custom_ids already succeeded" in output and "nothing to do" in output
        assert "line 4" in output and "duplicate_custom_id" in output
        assert reported() == expected
        assert out.read_bytes() == kept
    uploads = "SELECT count(*) FROM files WHERE filename = $1"
    assert await pool.fetchval(uploads, name) == 1

    lines[4] = batch_line("m")  # fixed: it runs
    source.write_text(jsonl(lines))
    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert "1 requests, 0 bad lines" in output
    _assert_complete_output(out, ["a", "b", "m"])
    assert reported() == expected[:2]

    # Every line bad: the first run's batch failed (exit 1), and so does every rerun.
    source.write_text(jsonl(["[]", batch_line("x", model="nope")]))
    out.unlink()
    errors.unlink()
    for _ in range(2):
        code, output = await _finish(await _cli(stack, source, "-o", out), 60)
        assert code == 1, output
        assert reported() == [(1, "invalid_line"), (2, "unknown_model")]
    assert await pool.fetchval(uploads, name) == 3


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=stack.api_url, headers=stack.headers, timeout=60
    ) as client:
        yield client


async def _post(http: httpx.AsyncClient, text: str, key: str | None = None) -> httpx.Response:
    """Upload ``text`` as an input file and create a batch from it."""
    return await create_batch(http, text.encode(), idempotency_key=key)


async def _wait_status(
    http: httpx.AsyncClient, batch_id: str, statuses: tuple[str, ...], timeout: float = 60
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def reached() -> bool:
        found.update((await http.get(f"/v1/batches/{batch_id}")).json())
        return found["status"] in statuses

    await wait_for(reached, timeout=timeout, interval=0.1)
    return found


async def _jsonl_lines(http: httpx.AsyncClient, file_id: str | None) -> list[dict[str, Any]]:
    """The lines of one of an ended batch's files (none when it has no such file)."""
    if file_id is None:
        return []
    response = await http.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    return [orjson.loads(raw) for raw in response.content.splitlines()]


async def _assert_every_line_in_one_file(
    http: httpx.AsyncClient, done: dict[str, Any], ids: list[str], code: str
) -> None:
    """An ended batch that stopped some of its lines: each line is counted, and in its
    output file or (failed with ``code``) its error file, once."""
    counts = done["request_counts"]
    assert counts["total"] == len(ids) and counts["failed"] > 0
    assert counts["completed"] + counts["failed"] == len(ids)
    output = await _jsonl_lines(http, done["output_file_id"])
    errors = await _jsonl_lines(http, done["error_file_id"])
    assert len(output) == counts["completed"] and len(errors) == counts["failed"]
    assert sorted(line["custom_id"] for line in output + errors) == sorted(ids)
    assert {e["error"]["code"] for e in errors} == {code}


async def test_bad_lines_are_reported_by_line_number_and_good_lines_still_run(
    http: httpx.AsyncClient,
) -> None:
    good = batch_line("good-1", conversation_id=f"bf-{uuid.uuid4().hex[:8]}", top_p=1.0, seed=7)
    openai_style = batch_line("good-2", max_completion_tokens=1, stream=False, user="ada")
    del openai_style["body"]["max_tokens"]
    text = jsonl(
        [
            good,
            "{not json",
            "",  # blank lines are skipped, and still counted in line numbers
            {**batch_line("no-method"), "method": "GET"},
            {**batch_line("wrong-url"), "url": "/v1/embeddings"},
            batch_line("good-1"),
            batch_line("unknown-model", model="gpt-4o"),
            batch_line("too-long", max_tokens=100_000),
            batch_line("two", n=2),
            batch_line("tools", tools=[]),
            {"method": "POST", "url": "/v1/chat/completions", "body": {}},
            batch_line("empty", content=" "),
            openai_style,
        ]
    )
    response = await _post(http, text)
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["object"] == "batch"
    assert batch["request_counts"]["total"] == 12
    reported = {(e["line"], e["code"]) for e in batch["errors"]["data"]}
    assert reported == {
        (2, "invalid_json"),
        (4, "invalid_method"),
        (5, "invalid_url"),
        (6, "duplicate_custom_id"),
        (7, "unknown_model"),
        (8, "max_tokens_out_of_range"),
        (9, "unsupported_value"),
        (10, "unsupported_field"),
        (11, "invalid_custom_id"),
        (12, "invalid_request"),
    }
    done = await _wait_status(http, batch["id"], ("completed",))
    assert done["request_counts"] == {"total": 12, "completed": 2, "failed": 10}
    assert done["in_progress_at"] and done["finalizing_at"] and done["completed_at"]
    output = await _jsonl_lines(http, done["output_file_id"])
    assert sorted(line["custom_id"] for line in output) == ["good-1", "good-2"]
    errors = await _jsonl_lines(http, done["error_file_id"])
    assert {(e["error"]["line"], e["error"]["code"]) for e in errors} == reported
    assert all(e["response"] is None for e in errors)

    # A batch whose every line is bad ends failed.
    response = await _post(http, jsonl(["[]", batch_line("x", model="nope")]))
    assert response.status_code == 202
    failed = response.json()
    assert failed["status"] == "failed" and failed["failed_at"]
    assert failed["request_counts"] == {"total": 2, "completed": 0, "failed": 2}


async def test_an_api_out_of_reach_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    from io import StringIO

    from rich.console import Console

    from kontext.app.embedded import free_port
    from producers.backfill import Backfill

    source = tmp_path / "in.jsonl"
    source.write_text(jsonl([batch_line("a")]))
    out, said = tmp_path / "out.jsonl", StringIO()
    api = f"http://127.0.0.1:{free_port()}"
    runner = Backfill(api, source, out, tmp_path / "errors.jsonl", Console(file=said, width=400))
    assert await runner.run(asyncio.Event()) == 1
    [line] = said.getvalue().splitlines()
    assert line.startswith(f"cannot reach the Kontext API at {api}: ")
    assert not out.exists()


async def test_bad_input_and_unwritable_outputs_are_one_line_and_exit_code_2(
    stack: Stack, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Found before anything is submitted, not after the batch ran; no traceback."""
    name = f"{uuid.uuid4().hex}.jsonl"
    good, empty, latin = tmp_path / name, tmp_path / "empty" / name, tmp_path / "latin" / name
    for path in (empty, latin):
        path.parent.mkdir()
    good.write_text(jsonl([batch_line("p-1")]))
    empty.write_text("\n  \n")
    latin.write_bytes(jsonl([batch_line("caf\xe9")]).encode("latin-1"))
    out = tmp_path / "out.jsonl"
    cases: list[tuple[tuple[str | Path, ...], str]] = [
        ((empty, "-o", out), "the input has no request lines"),
        ((tmp_path, "-o", out), "is a directory"),
        ((latin, "-o", out), "is not UTF-8 text"),
        ((good, "-o", tmp_path / "missing" / "out.jsonl"), "cannot write"),
        ((good, "-o", tmp_path), "is a directory"),
        ((good, "-o", out, "--errors", tmp_path / "missing" / "errors.jsonl"), "cannot write"),
    ]
    for args, said in cases:
        code, output = await _finish(await _cli(stack, *args), 60)
        assert code == 2, output
        [line] = output.splitlines()
        assert said in line
    assert not out.exists()
    assert await pool.fetchval("SELECT count(*) FROM files WHERE filename = $1", name) == 0


def test_a_lines_stop_sequences_reach_its_job() -> None:
    lines = [
        batch_line("one", stop="\n"),
        batch_line("four", stop=["a", "b", "c", "d"]),
        batch_line("five", stop=["a", "b", "c", "d", "e"]),
    ]
    parsed = parse(Settings(engines=["tiny"]), jsonl(lines))
    assert [(c, r.stop) for c, r in parsed.good] == [("one", ["\n"]), ("four", list("abcd"))]
    [refused] = parsed.errors
    assert (refused.line, refused.code) == (3, "invalid_request")
    assert "body.stop" in refused.message


def test_a_line_may_ask_for_log_probabilities_and_a_nucleus() -> None:
    lines = [
        batch_line("scored", logprobs=True, top_logprobs=0, temperature=0.5, top_p=0.25),
        batch_line("plain", logprobs=False),
        batch_line("alternatives", logprobs=True, top_logprobs=3),
    ]
    parsed = parse(Settings(engines=["tiny"]), jsonl(lines))
    assert [(c, r.logprobs) for c, r in parsed.good] == [("scored", True), ("plain", False)]
    assert [r.top_p for _, r in parsed.good] == [0.25, 1.0]
    assert [(e.line, e.code) for e in parsed.errors] == [(3, "unsupported_value")]


async def test_nul_characters_are_refused_and_nothing_is_left_validating(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Postgres holds no NUL: a line with one in its custom_id (or a key) is a bad line,
    one in the batch's own fields a 422; the connection keeps serving."""
    began = await pool.fetchval("SELECT now()")
    text = jsonl(
        [
            batch_line("fine"),
            batch_line("nul\x00id"),
            {**batch_line("nul-key"), "\x00": 1},
        ]
    )
    response = await _post(http, text)
    assert response.status_code == 202, response.text
    batch = response.json()
    reported = {(e["line"], e["code"]) for e in batch["errors"]["data"]}
    assert reported == {(2, "invalid_custom_id"), (3, "invalid_line")}
    done = await _wait_status(http, batch["id"], ("completed",))
    errors = await _jsonl_lines(http, done["error_file_id"])
    assert [(e["error"]["line"], e["custom_id"]) for e in errors] == [(2, None), (3, "nul-key")]
    assert "\\u0000" in errors[1]["error"]["message"]

    uploaded = (await upload(http, jsonl([batch_line("x")]).encode())).json()["id"]
    body = {"input_file_id": uploaded, "endpoint": ENDPOINT, "completion_window": "24h"}
    for extra in (
        {"metadata": {"k": "v\x00"}},
        {"metadata": {"k\x00": "v"}},
        {"idempotency_key": "key\x00"},
    ):
        refused = await http.post("/v1/batches", json={**body, **extra})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_request"
        assert "NUL" in refused.json()["error"]["message"]
    stuck = "SELECT count(*) FROM batches WHERE status = 'validating' AND created_at >= $1"
    assert await pool.fetchval(stuck, began) == 0
    assert (await http.post("/v1/batches", json=body)).status_code == 202


async def test_lines_split_at_newlines_alone_and_a_bom_is_skipped(
    stack: Stack, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A JSON string may hold U+2028, U+2029 and U+0085 raw (``ensure_ascii=False``);
    a Windows editor adds CRLFs and a BOM. None of them makes a bad line."""
    raw = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line"]
    lines = [json.dumps(batch_line(f"u-{i}", c), ensure_ascii=False) for i, c in enumerate(raw)]
    text = "\ufeff" + "\r\n".join(lines) + "\r\n"
    response = await _post(http, text)
    assert response.status_code == 202, response.text
    assert response.json()["errors"] is None
    assert response.json()["request_counts"]["total"] == 3
    done = await _wait_status(http, response.json()["id"], ("completed",))
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(text.encode())
    code, output = await _finish(await _cli(stack, source, "-o", out), 120)
    assert code == 0, output
    assert "3 succeeded, 0 failed, 0 bad lines" in output
    _assert_complete_output(out, ["u-0", "u-1", "u-2"])


async def test_a_retried_submission_returns_the_same_batch_and_never_duplicates(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    key = f"retry-{uuid.uuid4().hex}"
    text = jsonl([batch_line(f"r-{i}") for i in range(50)])
    first, again = await asyncio.gather(_post(http, text, key), _post(http, text, key))
    assert {first.status_code, again.status_code} == {200, 202}
    assert first.json()["id"] == again.json()["id"]
    batch_id = uuid.UUID(first.json()["id"])
    await _wait_status(http, str(batch_id), ("completed",))
    assert await pool.fetchval("SELECT count(*) FROM jobs WHERE batch_id = $1", batch_id) == 50
    assert (await _post(http, text, key)).status_code == 200
    other = await _post(http, jsonl([batch_line("other")]), key)
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"


async def test_cancel_stops_the_batch_and_accounts_for_everybatch_line(
    http: httpx.AsyncClient,
) -> None:
    ids = [f"c-{i}" for i in range(3000)]
    response = await _post(http, jsonl([batch_line(c) for c in ids]))
    assert response.status_code == 202
    batch_id = response.json()["id"]
    response = await http.post(f"/v1/batches/{batch_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] in ("cancelling", "cancelled")
    assert response.json()["cancelling_at"]
    done = await _wait_status(http, batch_id, ("cancelled",))
    assert done["cancelled_at"] and done["completed_at"] is None
    await _assert_every_line_in_one_file(http, done, ids, "batch_cancelled")

    again = await http.post(f"/v1/batches/{batch_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    finished = await _post(http, jsonl([batch_line("finished")]))
    await _wait_status(http, finished.json()["id"], ("completed",))
    refused = await http.post(f"/v1/batches/{finished.json()['id']}/cancel")
    assert refused.status_code == 409
    assert (await http.post(f"/v1/batches/{uuid.uuid4()}/cancel")).status_code == 404


async def test_an_expired_batch_accounts_for_every_line_even_those_running(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """The lines running when the batch expires finish (or fail before the engine); the
    batch turns ``expired``, with its files, only once none is left to run."""
    ids = [f"e-{i}" for i in range(3000)]
    response = await _post(http, jsonl([batch_line(c) for c in ids]))
    assert response.status_code == 202
    batch_id = response.json()["id"]

    async def running() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM jobs WHERE batch_id = $1 AND status = 'running'",
                uuid.UUID(batch_id),
            )
        )

    await wait_for(running, timeout=60, interval=0.01)
    await pool.execute("UPDATE batches SET expires_at = now() WHERE id = $1", uuid.UUID(batch_id))
    done = await _wait_status(http, batch_id, ("expired",))
    assert done["expired_at"] and done["completed_at"] is None
    await _assert_every_line_in_one_file(http, done, ids, "batch_expired")
    still = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE batch_id = $1 AND status NOT IN ('succeeded', 'failed')",
        uuid.UUID(batch_id),
    )
    assert still == 0
    assert (await http.post(f"/v1/batches/{batch_id}/cancel")).status_code == 409


async def test_every_line_a_batch_admits_names_its_batch(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """The ledger keeps each line's request with its batch, so a line re-driven after a
    cancel is stopped too (``tests/test_stopped_batches.py``)."""
    created = await _post(http, jsonl([batch_line(f"n-{i}") for i in range(3)]))
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    named = await pool.fetch(
        "SELECT request->>'batch_id' AS named FROM jobs WHERE batch_id = $1", uuid.UUID(batch_id)
    )
    assert [row["named"] for row in named] == [batch_id] * 3


async def test_an_interactive_job_overtakes_a_queued_backfill(http: httpx.AsyncClient) -> None:
    lines = 2000
    response = await _post(http, jsonl([batch_line(f"q-{i}") for i in range(lines)]))
    assert response.status_code == 202
    batch_id = response.json()["id"]
    try:
        submitted = await http.post(
            "/v1/jobs",
            json={"model": "tiny", "messages": [{"role": "user", "content": "me first"}]},
        )
        assert submitted.status_code == 202
        job_id = submitted.json()["id"]
        job: dict[str, Any] = {"status": "queued"}
        deadline = time.monotonic() + 120
        while job["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            job = (await http.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()
        assert job["status"] == "succeeded"
        counts = (await http.get(f"/v1/batches/{batch_id}")).json()["request_counts"]
        # Queued behind the backfill for enrichment or inference, it would come after most
        # of it; in its own lane it passes the queue.
        assert counts["completed"] + counts["failed"] < lines // 4, counts
    finally:
        await http.post(f"/v1/batches/{batch_id}/cancel")
        await _wait_status(http, batch_id, ("cancelled", "completed"))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serving() as receiver:
        yield receiver


async def test_batch_completed_webhook_reaches_a_real_receiver(
    http: httpx.AsyncClient, receiver: Receiver
) -> None:
    name = f"batch-{uuid.uuid4().hex[:8]}"
    response = await create_batch(
        http,
        jsonl([batch_line(f"w-{i}") for i in range(20)]).encode(),
        metadata={"purpose": "webhook test"},
        webhook={"url": receiver.hook(name)},
    )
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    await wait_for(lambda: receiver.calls[name], timeout=60, interval=0.1)
    [call] = receiver.calls[name]
    payload = Webhook(WEBHOOK_SECRETS[0]).verify(call.body, call.headers)
    assert payload["type"] == "batch.completed"
    data = payload["data"]
    assert data["id"] == batch_id and data["status"] == "completed"
    assert data["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert data["metadata"] == {"purpose": "webhook test"}
    assert data["output_file_id"] and data["error_file_id"] is None  # its files come along
    view = (await http.get(f"/v1/batches/{batch_id}")).json()
    assert {k: v for k, v in view.items() if k != "errors"} == data

    deliveries = (await http.get("/v1/webhooks/deliveries", params={"limit": 1000})).json()
    [delivery] = [d for d in deliveries["data"] if d["batch_id"] == batch_id]
    assert delivery["job_id"] is None and delivery["event_type"] == "batch.completed"
    assert call.headers["webhook-id"] == delivery["id"]
