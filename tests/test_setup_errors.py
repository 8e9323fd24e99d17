"""Setup errors are one line on stderr, without a traceback: a setting that cannot be
used names its variable (exit code 2); Postgres or Kafka out of reach where the
settings point says which, where (a password hidden) and why (exit code 1); a child
process that exits says so through its parent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres, free_port


def _kontext(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kontext.cli", *args],
        env={**os.environ, "KONTEXT_DATA_DIR": str(cwd / "data"), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _said(done: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The one line of the error: the last on stderr."""
    assert done.returncode == code, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_a_setting_that_cannot_be_used_is_named_by_its_variable(tmp_path: Path) -> None:
    bad = {"KONTEXT_BATCH_MAX_SIZE": "-3", "KONTEXT_EMBEDDER": "bert"}
    for command in (["up"], ["bench", "--engine", "null"], ["keys", "list"]):
        said = _said(_kontext(*command, cwd=tmp_path, **bad), code=2)
        assert said == (
            "kontext: KONTEXT_BATCH_MAX_SIZE: Input should be greater than or equal to 1;"
            " KONTEXT_EMBEDDER: Input should be 'minilm' or 'hash'"
        )
    for command, env in (
        (["up", "--engine", "gpt4"], {}),
        (["up"], {"KONTEXT_ENGINES": "tiny,gpt4"}),
        (["bench", "--engine", "gpt4"], {}),
    ):
        said = _said(_kontext(*command, cwd=tmp_path, **env), code=2)
        assert said.startswith("kontext: unknown engine 'gpt4' (--engine or KONTEXT_ENGINES)")
        assert said.endswith("known engines: smollm2, vllm, tiny, null")
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_an_unreachable_postgres_is_one_line_naming_it(
    broker: EmbeddedBroker, workdir: Path
) -> None:
    closed = f"postgresql://kontext:hunter2@127.0.0.1:{free_port()}/kontext"
    for command in (["up", "--engine", "null", "--port", "0"], ["keys", "list"]):
        done = _kontext(
            *command,
            cwd=workdir,
            DATABASE_URL=closed,
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        )
        said = _said(done)
        assert said.startswith("kontext: cannot connect to Postgres at postgresql://kontext:***@")
        assert "(DATABASE_URL)" in said and "hunter2" not in done.stderr + done.stdout


def test_a_missing_database_is_one_line_naming_it(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    missing = database.url.rsplit("/", 1)[0] + "/no_such_database"
    done = _kontext(
        "up",
        "--engine",
        "null",
        "--port",
        "0",
        cwd=workdir,
        DATABASE_URL=missing,
        KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
    )
    said = _said(done)
    assert "cannot connect to Postgres" in said
    assert 'database "no_such_database" does not exist' in said


def test_an_unreachable_kafka_is_one_line_naming_it_also_from_a_child(
    database: EmbeddedPostgres, workdir: Path
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    env = {"DATABASE_URL": database.url, "KAFKA_BOOTSTRAP_SERVERS": closed}
    alone = _said(_kontext("up", "--engine", "null", "--port", "0", cwd=workdir, **env))
    assert alone.startswith(f"kontext: cannot connect to Kafka at {closed}")
    assert "(KAFKA_BOOTSTRAP_SERVERS)" in alone

    spread = _kontext(
        "up", "--engine", "null", "--port", "0", "--process", "api", cwd=workdir, **env
    )
    said = _said(spread)
    assert said.startswith("kontext: the api process exited before it was ready (code 1): ")
    assert f"cannot connect to Kafka at {closed}" in said
    assert said.endswith(f"see {workdir / 'data' / 'api.log'}")


def _listening() -> socket.socket:
    """A socket listening on a free port of 127.0.0.1: a port another program holds."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def _quiet(done: subprocess.CompletedProcess[str]) -> str:
    """``_said``, with nothing on stderr of an unclosed client or a lost exception."""
    for noise in ("Exception ignored", "Unclosed", "never retrieved"):
        assert noise not in done.stderr, done.stderr
    return _said(done)


def test_a_port_in_use_is_one_line_naming_it_before_anything_starts(tmp_path: Path) -> None:
    with _listening() as held:
        port = held.getsockname()[1]
        for args, env, setting in (
            (["--port", str(port)], {}, "KONTEXT_API_PORT / --port"),
            (["--port", "0"], {"KONTEXT_METRICS_PORT": str(port)}, "KONTEXT_METRICS_PORT"),
        ):
            done = _kontext("up", "--engine", "null", *args, cwd=tmp_path, **env)
            assert _quiet(done) == f"kontext: port {port} on 127.0.0.1 is in use ({setting})"
            assert "Dev API key" not in done.stdout
    assert not (tmp_path / "data").exists()  # refused before the embedded services started


def test_a_worker_on_a_port_in_use_is_one_line_naming_it(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    """Found only when the service binds it (a port taken meanwhile): what the services
    had opened is closed, quietly."""
    env = {
        "DATABASE_URL": database.url,
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "KONTEXT_TOPIC_PREFIX": "taken",
    }
    with _listening() as held:
        port = held.getsockname()[1]
        api = _kontext("worker", "api", "recorder", "--port", str(port), cwd=workdir, **env)
        assert (
            _quiet(api)
            == f"kontext: port {port} on 127.0.0.1 is in use (KONTEXT_API_PORT / --port)"
        )
        metrics = _kontext("worker", "recorder", cwd=workdir, KONTEXT_METRICS_PORT=str(port), **env)
        assert (
            _quiet(metrics) == f"kontext: port {port} on 127.0.0.1 is in use (KONTEXT_METRICS_PORT)"
        )
