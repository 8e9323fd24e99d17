"""Commands run beside ``kontext up`` find its stack with nothing exported.

``kontext up`` prints the broker, the database URL and the dev key, and writes
them with the API URL to ``.kontext/stack.env`` (mode 600) for ``kontext keys``,
``kontext webhooks`` and the Python client; the file goes when the stack stops.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kontext import stackfile
from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from producers.client import KontextClient
from tests.conftest import Stack, run_cli, stack_env, start_stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def beside(
    broker: EmbeddedBroker, database: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Path]]:
    """A ``kontext up`` in a directory of its own."""
    here = tmp_path_factory.mktemp("beside")
    env = stack_env(broker, database, prefix=f"s{uuid.uuid4().hex[:8]}")
    running = start_stack(["up", "--engine", "tiny", "--port", "0"], env, here)
    yield running, here
    assert running.stop() == 0, "".join(running.output[-40:])


def _values(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_up_prints_and_writes_where_its_stack_is(beside: tuple[Stack, Path]) -> None:
    stack, here = beside
    output = "".join(stack.output)
    settings = stack.settings
    assert f"Kafka: {settings.bootstrap}" in output
    assert f"Postgres: {stackfile.without_password(settings.dsn)}" in output
    path = here / ".kontext" / "stack.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _values(path) == {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
        "DATABASE_URL": settings.dsn,
        "KONTEXT_API_URL": stack.api_url,
        "KONTEXT_TOPIC_PREFIX": settings.topic_prefix,
        "KONTEXT_API_KEY": stack.api_key,
    }


def test_keys_create_beside_the_stack_needs_no_database_url(beside: tuple[Stack, Path]) -> None:
    stack, here = beside
    created = run_cli(["keys", "create", "--tenant", "acme"], cwd=here, timeout=60)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("kx_")
    # The key works at the stack's API: an unknown job is 404 there, not 401.
    answer = httpx.get(
        f"{stack.api_url}/v1/jobs/{uuid.uuid4()}", headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 404


def test_a_printed_url_hides_its_password() -> None:
    shown = stackfile.without_password("postgresql://kontext:s3cret@db.internal:5432/kontext")
    assert shown == "postgresql://kontext:***@db.internal:5432/kontext"
    plain = "postgresql://postgres@127.0.0.1:5432/postgres"
    assert stackfile.without_password(plain) == plain


def test_without_a_stack_the_error_says_what_to_do(tmp_path: Path) -> None:
    refused = run_cli(["keys", "list"], cwd=tmp_path, timeout=60)
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "DATABASE_URL is not set" in message
    assert "kontext up" in message and "stack.env" in message


async def test_the_python_client_finds_the_stack(
    beside: tuple[Stack, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, here = beside
    for name in list(os.environ):
        if name.startswith("KONTEXT_") or name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(here)
    async with KontextClient.from_environment() as client:
        reply = await client.chat(
            model="tiny", messages=[{"role": "user", "content": "hello there"}], timeout=60
        )
    assert reply.status == "succeeded"


def test_the_file_goes_when_the_stack_stops(
    broker: EmbeddedBroker, database: EmbeddedPostgres, tmp_path: Path
) -> None:
    env = stack_env(broker, database, prefix=f"g{uuid.uuid4().hex[:8]}")
    running = start_stack(["up", "--engine", "tiny", "--port", "0"], env, tmp_path)
    path = tmp_path / ".kontext" / "stack.env"
    assert path.is_file()
    assert running.stop() == 0
    assert not path.exists()
