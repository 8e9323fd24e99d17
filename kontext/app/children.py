"""Services in child processes: ``kontext worker A B ...`` per group, against the
parent's broker and database, each until the parent stops it.

A process runs one event loop on one core; spreading the services over several
processes lets a machine's cores share the work, as production's one service
per container does. A child counts as started once it prints its ready line;
its output goes to a log file beside the embedded stack's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kontext.app.embedded import free_port
from kontext.settings import Settings
from kontext.tasks import run_against

READY = re.compile(r"Kontext ready: (?:API (http://\S+?);|no API;)")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 2.0
"""How long an exited child's last output is waited for."""
T = TypeVar("T")


class ChildExited(RuntimeError):
    """A child process exited while its parent still needed it."""

    def __init__(self, child: Child, code: int | None, before_ready: bool = False) -> None:
        when = " before it was ready" if before_ready else ""
        said = f": {child.last_line}" if child.last_line else ""
        super().__init__(
            f"the {', '.join(child.services)} process exited{when} (code {code}){said};"
            f" see {child.log}"
        )


@dataclass
class Child:
    """One running child: what it runs, where its API and metrics are, its log."""

    services: tuple[str, ...]
    process: asyncio.subprocess.Process
    log: Path
    metrics_url: str
    api_url: str | None = None
    pump: asyncio.Task[None] | None = None
    """Copies its output to its log."""
    last_line: str = ""
    """The last line it wrote: why it stopped, when it stopped on an error."""

    @property
    def pid(self) -> int:
        return self.process.pid


class Children:
    """The running children of one parent."""

    def __init__(self, children: Sequence[Child]) -> None:
        self.all = list(children)

    @property
    def api_url(self) -> str | None:
        return next((c.api_url for c in self.all if c.api_url), None)

    def running(self, service: str) -> Child | None:
        return next((c for c in self.all if service in c.services), None)

    async def guard(self, work: Awaitable[T]) -> T:
        """``work``'s result; if a child exits first, the work is cancelled and this
        raises ChildExited, with its last line and its log (no wait for turns that never
        end)."""
        task = await run_against(work, *(c.process.wait() for c in self.all))
        if task.cancelled():
            gone = next(c for c in self.all if c.process.returncode is not None)
            if gone.pump is not None:  # its last lines, unless a grandchild keeps its pipe
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(gone.pump), DRAIN_TIMEOUT_S)
            raise ChildExited(gone, gone.process.returncode)
        return task.result()


async def _start(
    settings: Settings, services: Sequence[str], env: Mapping[str, str], log_path: Path
) -> Child:
    port = free_port()
    child_env = {
        **os.environ,
        **env,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap,
        "DATABASE_URL": settings.dsn,
        "KONTEXT_ENGINES": ",".join(settings.engines),
        "KONTEXT_REDRIVE_AT_START": str(settings.redrive_at_start).lower(),
        "KONTEXT_METRICS_HOST": settings.metrics_host,
        "KONTEXT_METRICS_PORT": str(port),
        # A parent killed outright cannot stop it: it stops itself (SIGTERM, graceful).
        "KONTEXT_PARENT_PID": str(os.getpid()),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kontext.cli",
        "worker",
        *services,
        "--port",
        str(settings.api_port),
        env=child_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own session: a terminal's Ctrl-C reaches the parent, which stops it in turn.
        start_new_session=True,
    )
    metrics_url = f"http://{settings.metrics_host}:{port}/metrics"
    child = Child(tuple(services), process, log_path, metrics_url)
    ready: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    child.pump = asyncio.create_task(_pump(child, ready), name=f"log-{'-'.join(services)}")
    try:
        child.api_url = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT_S)
    except (TimeoutError, RuntimeError):
        await _stop(child)
        raise
    return child


async def _pump(child: Child, ready: asyncio.Future[str | None]) -> None:
    """Copy the child's output to its log; resolve ``ready`` at its ready line (or fail
    it if the child exits first)."""
    assert child.process.stdout is not None
    child.log.parent.mkdir(parents=True, exist_ok=True)
    with child.log.open("ab") as log:
        async for line in child.process.stdout:
            log.write(line)
            log.flush()
            text = line.decode(errors="replace")
            if text.strip():
                child.last_line = text.strip()
            if not ready.done() and (match := READY.search(text)):
                ready.set_result(match.group(1))
    if not ready.done():
        ready.set_exception(ChildExited(child, await child.process.wait(), before_ready=True))


async def _stop(child: Child) -> None:
    if child.process.returncode is None:
        child.process.terminate()
        try:
            await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
    if child.pump is not None:
        await child.pump


@contextlib.asynccontextmanager
async def spawned(
    settings: Settings,
    groups: Sequence[Sequence[str]],
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> AsyncIterator[Children]:
    """One child per group of services, all started before the block, stopped after it.
    ``env``: settings the parent changed in code, as KONTEXT_ variables."""
    logs = log_dir or settings.data_dir
    started: list[Child] = []
    try:
        for group in groups:
            log_path = logs / f"{'-'.join(group)}.log"
            started.append(await _start(settings, group, env or {}, log_path))
        yield Children(started)
    finally:
        await asyncio.gather(*(_stop(child) for child in started))
