"""The inference worker in its own process for ``kontext bench --separate-inference``.

Production runs each inference worker as its own process (``kontext worker
inference``). In one process, the engine's ``generate`` thread shares the GIL
with every other service's event loop, which slows a GPU engine whose decode
loop is launch-bound. This starts that worker against the benchmark's broker
and database, and reads its batch-size histogram from its metrics endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kontext.embedded import free_port
from kontext.settings import Settings

STOP_TIMEOUT_S = 30.0


@contextlib.asynccontextmanager
async def inference_process(
    settings: Settings, engine: str, log_path: Path, overrides: dict[str, str]
) -> AsyncIterator[str]:
    """``kontext worker inference`` for ``engine`` in a child process; yields its metrics
    URL. ``overrides``: settings the parent changed in code, as KONTEXT_ variables."""
    port = free_port()
    env = {
        **os.environ,
        **overrides,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
        "DATABASE_URL": settings.dsn,
        "KONTEXT_ENGINES": engine,
        "KONTEXT_METRICS_HOST": "127.0.0.1",
        "KONTEXT_METRICS_PORT": str(port),
    }
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "kontext.cli",
            "worker",
            "inference",
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            yield f"http://127.0.0.1:{port}/metrics"
        finally:
            if child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(child.wait(), STOP_TIMEOUT_S)
                except TimeoutError:
                    child.kill()
                    await child.wait()


async def scrape(url: str) -> list[Metric]:
    """The metric families a Prometheus endpoint serves now."""
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
        response.raise_for_status()
    return list(text_string_to_metric_families(response.text))
