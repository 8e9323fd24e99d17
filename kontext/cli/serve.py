"""``kontext up|worker|demo|migrate|health``: run the stack, one service, the demo."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Annotated

import typer

from kontext import ports, stackfile
from kontext.app.children import Child, spawned
from kontext.app.embedded import embedded, stop_with_parent
from kontext.app.process import (
    console,
    run_until_signal,
    run_work,
    serve,
    settings_for,
    setup_logging,
)
from kontext.app.runtime import SERVICES, Runtime, prepare
from kontext.settings import Settings
from kontext.store import keys

EngineOption = Annotated[
    list[str] | None,
    typer.Option("--engine", "-e", help="Model to serve (repeatable). Default: KONTEXT_ENGINES."),
]
PortOption = Annotated[int | None, typer.Option("--port", "-p", help="API port (0: any free one).")]


ProcessOption = Annotated[
    list[str] | None,
    typer.Option(
        "--process",
        help="Services to run in a child process of their own, comma-separated "
        "(repeatable: one child each); the rest run in this process.",
    ),
]


def up(
    engine: EngineOption = None,
    port: PortOption = None,
    process: ProcessOption = None,
    verbose: bool = False,
) -> None:
    """Run the API and every worker: in this process, or spread over child processes
    with --process so that every core works.

    Starts an embedded Kafka broker and PostgreSQL unless KAFKA_BOOTSTRAP_SERVERS
    and DATABASE_URL are set; creates topics and applies migrations.
    """
    setup_logging(verbose)
    groups = [[name.strip() for name in g.split(",") if name.strip()] for g in process or []]
    named = [name for group in groups for name in group]
    unknown = sorted(set(named) - set(SERVICES))
    if unknown or len(named) != len(set(named)):
        console.print(
            f"[red]--process takes each of {', '.join(SERVICES)} at most once; "
            f"unknown: {', '.join(unknown) or 'none'}"
        )
        raise typer.Exit(2)
    here = [name for name in SERVICES if name not in named]
    wanted = settings_for(engine, port)
    # A taken port is refused before the embedded services start (CannotListen).
    ports.check_free(wanted.api_host, wanted.api_port, ports.API_PORT)
    ports.check_free(wanted.metrics_host, wanted.metrics_port, ports.METRICS_PORT)
    with embedded(wanted) as settings:

        async def main(stop: asyncio.Event) -> None:
            await prepare(settings)
            key = await keys.mint(settings.dsn)
            print(f"Dev API key (tenant default): {key}", flush=True)

            running: list[Child] = []

            def announce(url: str | None) -> None:
                written = stackfile.write(settings, url, key)
                metrics = "".join(
                    f"Metrics of {', '.join(c.services)}: {c.metrics_url}\n" for c in running
                )
                print(
                    f"Kafka: {settings.bootstrap}\n"
                    f"Postgres: {stackfile.without_password(settings.dsn)}\n"
                    f"{metrics}"
                    f"Other commands here (kontext keys, kontext backfill, the Python client) "
                    f"find this stack in {written}",
                    flush=True,
                )

            async with spawned(settings, [g for g in groups if g]) as children:
                running.extend(children.all)
                await children.guard(
                    serve(settings, here, stop, api_url=children.api_url, on_ready=announce)
                )

        try:
            run_until_signal(main)
        finally:
            stackfile.remove(settings)


def worker(
    names: Annotated[list[str], typer.Argument(help=f"Any of: {', '.join(SERVICES)}.")],
    engine: EngineOption = None,
    port: PortOption = None,
    verbose: bool = False,
) -> None:
    """Run some services against external Kafka and Postgres (how production scales out:
    one service per container)."""
    setup_logging(verbose)
    unknown = [name for name in names if name not in SERVICES]
    if unknown:
        console.print(f"[red]unknown service {unknown[0]!r}; choose from: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    settings = settings_for(engine, port)
    if not settings.kafka_bootstrap_servers or not settings.database_url:
        console.print("[red]kontext worker needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL")
        raise typer.Exit(2)
    ordered = [name for name in SERVICES if name in names]
    if settings.parent_pid is not None:
        stop_with_parent(signal.SIGTERM, settings.parent_pid)
    run_until_signal(lambda stop: serve(settings, ordered, stop))


def health_command(
    max_age: Annotated[float, typer.Option(help="Oldest heartbeat that passes, in seconds.")] = 30,
) -> None:
    """Exit 0 if this machine's worker process is alive (its KONTEXT_HEALTH_FILE is fresh)."""
    from kontext.app.health import age_s

    path = Settings().health_file
    if path is None:
        console.print("[red]KONTEXT_HEALTH_FILE is not set")
        raise typer.Exit(2)
    age = age_s(path)
    if age is None or age > max_age:
        seen = "no heartbeat" if age is None else f"last heartbeat {age:.0f}s ago"
        console.print(f"[red]unhealthy: {seen} ({path})")
        raise typer.Exit(1)
    console.print(f"healthy: heartbeat {age:.1f}s ago")


def migrate_command() -> None:
    """Apply database migrations to DATABASE_URL."""
    settings = Settings()
    if not settings.database_url:
        console.print("[red]DATABASE_URL is not set")
        raise typer.Exit(2)
    asyncio.run(prepare(settings))
    console.print("database is at the latest migration")


DEMO_TURNS = (
    "Hi! My name is Ada and I live in Lisbon. Please remember that.",
    "Suggest one hobby for a rainy afternoon, in one sentence.",
    "What is my name, and in which city do I live?",
)
DEMO_FACTS = ("Ada", "Lisbon")
"""What the first turn tells and the last asks for: the last turn's prompt must carry it."""


def demo(engine: Annotated[str, typer.Option("--engine", "-e")] = "smollm2") -> None:
    """Start everything on the embedded defaults and run a scripted 3-turn conversation;
    exit 1 if the last turn's prompt did not carry what the first told."""
    from producers.client import KontextClient

    setup_logging(False)
    remembered = False
    with embedded(settings_for([engine], 0)) as settings:

        async def conversation(runtime: Runtime, url: str) -> None:
            nonlocal remembered
            key = await keys.mint(settings.dsn)
            async with KontextClient(
                url, settings.bootstrap, topics=settings.topics, api_key=key
            ) as client:
                conversation_id = None
                for number, text in enumerate(DEMO_TURNS, 1):
                    last = number == len(DEMO_TURNS)
                    began = time.perf_counter()
                    reply = await client.chat(
                        model=engine,
                        messages=[{"role": "user", "content": text}],
                        conversation_id=conversation_id,
                        max_tokens=48,
                        include_prompt=last,
                        timeout=120,
                    )
                    elapsed = (time.perf_counter() - began) * 1000
                    conversation_id = reply.conversation_id
                    if reply.result is None:
                        raise RuntimeError(f"turn {number} failed: {reply.error}")
                    answer = reply.result.choices[0].message.content.strip()
                    context = reply.result.context
                    earlier = len(context.turns) if context else 0
                    print(f"\n[turn {number}] user: {text}")
                    print(f"[turn {number}] assistant: {answer}")
                    print(f"[turn {number}] {elapsed:.0f} ms, {earlier} earlier turns in context")
                    if last:
                        prompt = context.prompt if context else None
                        carried = prompt is not None and all(f in prompt for f in DEMO_FACTS)
                        print(
                            f"[turn {number}] memory: its prompt carried turn 1's "
                            f"{' and '.join(DEMO_FACTS)}: {'yes' if carried else 'NO'}. "
                            "Answering from them is the model's part (SmolLM2-135M, the "
                            "default, often does not)."
                        )
                        remembered = carried
            print(f"\nconversation {conversation_id}: {len(DEMO_TURNS)} turns", flush=True)

        run_work(settings, conversation)
    if not remembered:
        raise typer.Exit(1)
