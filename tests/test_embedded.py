"""The embedded broker and database the project starts for ``kontext up``, the tests,
the demo and benchmarks; one stack at a time on a data directory."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from kontext.app.embedded import EmbeddedBroker
from tests.conftest import embedded_env, gone, start_stack

WORKER_NAMES = ("tokio-rt-worker", "tokio-runtime-w")
"""What tokio names a runtime worker thread (the second: an older name, cut to 15 bytes)."""


def _runtime_workers(pid: int) -> int:
    """The broker's runtime worker threads (tokio-rt-worker, as tokio names them)."""
    return sum(
        1
        for task in Path(f"/proc/{pid}/task").iterdir()
        if (task / "comm").read_text().strip() in WORKER_NAMES
    )


@pytest.mark.parametrize(("configured", "expected"), [(None, 1), ("3", 3)])
def test_the_broker_runs_one_runtime_thread_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str | None, expected: int
) -> None:
    if configured is None:
        monkeypatch.delenv("TOKIO_WORKER_THREADS", raising=False)
    else:
        monkeypatch.setenv("TOKIO_WORKER_THREADS", configured)
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    try:
        assert broker.pid is not None
        assert _runtime_workers(broker.pid) == expected
    finally:
        broker.stop()


def _postmaster(data_dir: Path) -> psutil.Process:
    """The Postgres server running on ``data_dir``'s database (its postmaster.pid)."""
    return psutil.Process(int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0]))


def test_a_second_stack_on_a_data_dir_in_use_is_refused_and_the_first_keeps_running(
    workdir: Path,
) -> None:
    data_dir = workdir / f"in-use-{uuid.uuid4().hex[:6]}"
    env = {**embedded_env(), "KONTEXT_DATA_DIR": str(data_dir)}
    first = start_stack(["up", "--engine", "null", "--port", "0"], env, workdir)
    try:
        server = _postmaster(data_dir)
        refusal = (
            f"kontext: a stack is already running on {data_dir} (pid {first.process.pid}); "
            "stop it first or set KONTEXT_DATA_DIR"
        )
        bench = ["bench", "--engine", "null", "--conversations", "1", "--turns", "2"]
        for command in (["up", "--engine", "null", "--port", "0"], bench):
            second = subprocess.run(
                [sys.executable, "-m", "kontext.cli", *command],
                env=env,
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (second.returncode, second.stderr.strip()) == (1, refusal), second.stdout
        assert server.is_running() and not gone(server)
        assert (data_dir / "stack.env").is_file()
        assert httpx.get(f"{first.api_url}/readyz").status_code == 200
    finally:
        code = first.stop()
    assert code == 0, "".join(first.output[-40:])


def test_a_server_left_on_the_data_dir_by_a_stack_that_is_gone_is_stopped(workdir: Path) -> None:
    """A Postgres server on the data directory while no ``kontext`` process holds it (its
    owner killed where no parent-death signal stopped it) is stopped, not kept."""
    data_dir = workdir / f"stale-{uuid.uuid4().hex[:6]}"
    # Started by a process that then exits, as a killed ``kontext up`` would leave it.
    leave = (
        "import sys; from pathlib import Path; from kontext.app.embedded import EmbeddedPostgres;"
        " print(EmbeddedPostgres(Path(sys.argv[1])).start().pid)"
    )
    started = subprocess.run(
        [sys.executable, "-c", leave, str(data_dir / "postgres")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    stale = psutil.Process(int(started.stdout))
    env = {**embedded_env(), "KONTEXT_DATA_DIR": str(data_dir)}
    try:
        stack = start_stack(["up", "--engine", "null", "--port", "0"], env, workdir)
        try:
            assert gone(stale)
            assert _postmaster(data_dir).pid != stale.pid
            assert httpx.get(f"{stack.api_url}/readyz").status_code == 200
        finally:
            code = stack.stop()
        assert code == 0, "".join(stack.output[-40:])
    finally:
        with contextlib.suppress(psutil.Error):
            stale.kill()
