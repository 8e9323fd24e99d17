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
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kontext.app.embedded import free_port
from kontext.settings import Settings

STOP_TIMEOUT_S = 30.0
T = TypeVar("T")


class InferenceProcess:
    """The running child: its metrics URL, and a guard for work that needs it."""

    def __init__(self, child: asyncio.subprocess.Process, metrics_url: str, log: Path) -> None:
        self.child = child
        self.metrics_url = metrics_url
        self.log = log

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result; if the child exits first, the work is cancelled and this
        raises RuntimeError naming the child's log (no wait for turns that never end)."""
        task = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self.child.wait())
        try:
            await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            exited.cancel()
        if task.cancelled():
            raise RuntimeError(
                f"the inference worker exited (code {self.child.returncode}); see {self.log}"
            )
        return task.result()


@contextlib.asynccontextmanager
async def inference_process(
    settings: Settings, engine: str, log_path: Path, overrides: dict[str, str]
) -> AsyncIterator[InferenceProcess]:
    """``kontext worker inference`` for ``engine`` in a child process, stopped on exit.
    ``overrides``: settings the parent changed in code, as KONTEXT_ variables."""
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
            yield InferenceProcess(child, f"http://127.0.0.1:{port}/metrics", log_path)
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
