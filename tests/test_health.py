"""Health endpoints and worker liveness, as an orchestrator sees them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil

from kontext.app.embedded import EmbeddedBroker, EmbeddedPostgres
from tests.conftest import Stack, stack_env, start_stack, wait_for


async def test_readiness_checks_postgres_and_kafka_without_a_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url) as http:
        live = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"postgres": "ok", "kafka": "ok"}}


def _healthy(env: dict[str, str], max_age: float) -> bool:
    check = subprocess.run(
        [sys.executable, "-m", "kontext.cli", "health", "--max-age", str(max_age)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return check.returncode == 0


def _start_worker(name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kontext.cli", "worker", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_a_worker_whose_event_loop_stops_fails_its_healthcheck(
    broker: EmbeddedBroker, database: EmbeddedPostgres, workdir: Path
) -> None:
    env = stack_env(broker, database, prefix=f"h{uuid.uuid4().hex[:8]}")
    env["KONTEXT_HEALTH_FILE"] = str(workdir / f"alive-{uuid.uuid4().hex[:6]}")
    assert not _healthy(env, 30), "no heartbeat yet, so not healthy"
    worker = _start_worker("recorder", env)
    try:
        await wait_for(lambda: _healthy(env, 30), timeout=90, interval=0.5)
        # A frozen process (here: stopped) stops beating; a short max age sees it.
        os.kill(worker.pid, signal.SIGSTOP)
        await wait_for(lambda: not _healthy(env, 2), timeout=30, interval=0.5)
        os.kill(worker.pid, signal.SIGCONT)
        await wait_for(lambda: _healthy(env, 2), timeout=30, interval=0.5)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    assert _healthy(env, 3600) is False, "a stopped worker leaves no heartbeat"


async def test_readiness_answers_in_its_limit_while_postgres_hangs(
    broker: EmbeddedBroker, database: EmbeddedPostgres, tmp_path: Path, workdir: Path
) -> None:
    """A Postgres that stopped answering (here: stopped) makes the replica unready at
    once, not once the hung query's cleanup gives up."""
    own = EmbeddedPostgres(tmp_path / "postgres").start()
    try:
        env = stack_env(broker, database, prefix=f"r{uuid.uuid4().hex[:8]}")
        env["DATABASE_URL"] = own.url
        stack = start_stack(["up", "--engine", "tiny", "--port", "0"], env, workdir)
        assert own.pid is not None
        server = psutil.Process(own.pid)
        frozen = [server, *server.children(recursive=True)]
        try:
            for process in frozen:
                process.suspend()
            async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as http:
                ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"] == {
                "postgres": "unavailable: TimeoutError",
                "kafka": "ok",
            }
        finally:
            for process in frozen:
                process.resume()
            assert stack.stop() == 0, "".join(stack.output[-40:])
    finally:
        own.stop()
