"""Running a Kontext process from a command: its logging, its settings from the
command's options, and running it until its work ends or a signal stops it."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import typer
import uvloop
from rich.console import Console
from rich.logging import RichHandler

from kontext.app.runtime import SERVICES, Runtime, run_while
from kontext.settings import BadSetting, Settings
from kontext.tasks import run_against
from workers.engines import ENGINE_NAMES

console = Console(stderr=True)
T = TypeVar("T")


def setup_logging(verbose: bool) -> None:
    """Log lines through rich on stderr; the chatty libraries at WARNING."""
    # Model loads print tqdm bars per weight file; the CLI reports its own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("aiokafka", "faust", "mode", "kafka", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_for(engines: list[str] | None, port: int | None) -> Settings:
    """The environment's settings, with the engines and API port a command was given;
    BadSetting names an engine that does not exist."""
    settings = Settings()
    updates: dict[str, object] = {}
    if engines:
        updates["engines"] = engines
    if port is not None:
        updates["api_port"] = port
    settings = settings.model_copy(update=updates)
    unknown = [name for name in settings.engines if name not in ENGINE_NAMES]
    if unknown:
        raise BadSetting(
            f"unknown engine {', '.join(map(repr, unknown))} (--engine or KONTEXT_ENGINES);"
            f" known engines: {', '.join(ENGINE_NAMES)}"
        )
    return settings


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between collections of the youngest generation (Python's default: 700).
Every message a stage handles allocates a few hundred short-lived objects (pydantic
models, records, dicts); at the default a collection ran every few messages."""


def tune_gc() -> None:
    """Move what startup allocated (modules, schemas, settings) out of the collector's
    way, and collect the young generation less often: cycles are still collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main`` on a uvloop event loop, with the collector tuned for a long-running
    service (``tune_gc``), until it returns or SIGINT/SIGTERM asks it to stop."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    tune_gc()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(wrapper())


class Stopped(Exception):
    """A signal (SIGINT or SIGTERM) came before the work ended; the work was cancelled."""


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    """``work``'s result; if ``stop`` is set first, the work is cancelled, its cleanup
    runs, and this raises Stopped."""
    task = await run_against(work, stop.wait())
    if task.cancelled():
        raise Stopped
    return task.result()


def run_work(
    settings: Settings,
    work: Callable[[Runtime, str], Awaitable[T]],
    services: Sequence[str] = SERVICES,
) -> T:
    """Run ``work`` against the services of this process (``run_while``), until it ends
    or SIGINT/SIGTERM; a failure is one red line and exit code 1, not a traceback."""
    result: list[T] = []

    async def main(stop: asyncio.Event) -> None:
        result.append(await run_while(settings, work, stop, services))

    try:
        run_until_signal(main)
    except RuntimeError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(1) from None
    return result[0]


async def serve(
    settings: Settings,
    services: Sequence[str],
    stop: asyncio.Event,
    api_url: str | None = None,
    on_ready: Callable[[str | None], None] | None = None,
) -> None:
    """Run ``services`` until ``stop``; print the ready line once they all are (with the
    API's address: this process's, or ``api_url`` where another process serves it),
    after calling ``on_ready`` with that address."""
    runtime = Runtime(settings)

    def ready(rt: Runtime) -> None:
        port = rt.api_port
        url = f"http://{settings.api_host}:{port}" if port is not None else api_url
        api = f"API {url}" if url is not None else "no API"
        if on_ready is not None:  # first: once the line says ready, what it did is done
            on_ready(url)
        print(
            f"Kontext ready: {api}; services {', '.join(services)}; "
            f"models {', '.join(settings.engines)}; Kafka {settings.kafka_bootstrap_servers}",
            flush=True,
        )

    try:
        await runtime.start(services)
        await runtime.run(stop, ready)
    finally:
        console.print("Kontext stopped.")
